package replication

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// logCapture collects slog output as JSON lines so tests can assert the
// structured events (name + attributes) a decision produced.
type logCapture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *logCapture) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func newCapture() (*logCapture, *slog.Logger) {
	c := &logCapture{}
	return c, slog.New(slog.NewJSONHandler(c, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// events returns every logged event with the given msg.
func (c *logCapture) events(msg string) []map[string]any {
	c.mu.Lock()
	data := c.buf.String()
	c.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(data, "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// find returns the events with msg whose attributes include all of want
// (compared as strings).
func (c *logCapture) find(msg string, want map[string]string) []map[string]any {
	var out []map[string]any
	for _, e := range c.events(msg) {
		ok := true
		for k, v := range want {
			if s, _ := json.Marshal(e[k]); strings.Trim(string(s), `"`) != v {
				ok = false
				break
			}
		}
		if ok {
			out = append(out, e)
		}
	}
	return out
}

// waitEvent polls until an event matching want appears (generous deadline).
func (c *logCapture) waitEvent(t *testing.T, msg string, want map[string]string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if ev := c.find(msg, want); len(ev) > 0 {
			return ev[len(ev)-1]
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no %s event with %v; log:\n%s", msg, want, c.tail())
	return nil
}

func (c *logCapture) tail() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.buf.String()
	if len(s) > 20000 {
		s = s[len(s)-20000:]
	}
	return s
}
