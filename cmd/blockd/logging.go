package main

// Daemon logging: --log-level, --log-format text|json and, for serve,
// --log-file (default DATA/blockd.log) with warnings and errors also on
// the terminal. The raft library's own lines (event "raft") reach the
// terminal only at ERROR: the file has them all.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
)

func logFormatFlag() cli.Flag {
	return &cli.StringFlag{Name: "log-format", Value: "text", Usage: "log line format: text (key=value) or json (one object a line)"}
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("--log-level %s: use debug, info, warn or error", api.QuoteName(s))
	}
	return l, nil
}

func newHandler(w io.Writer, format string, level slog.Leveler) (slog.Handler, error) {
	opts := &slog.HandlerOptions{Level: level}
	switch format {
	case "", "text":
		return slog.NewTextHandler(w, opts), nil
	case "json":
		return slog.NewJSONHandler(w, opts), nil
	}
	return nil, fmt.Errorf("--log-format %s: use text or json", api.QuoteName(format))
}

// daemonLogger is the logger of master and server: every line on stderr.
func daemonLogger(c *cli.Context) (*slog.Logger, error) {
	lvl, err := parseLevel(c.String("log-level"))
	if err != nil {
		return nil, err
	}
	h, err := newHandler(os.Stderr, c.String("log-format"), lvl)
	if err != nil {
		return nil, err
	}
	return slog.New(h), nil
}

// serveLogger: every line at --log-level to the log file (DATA/blockd.log
// unless --log-file; "-" puts everything on stderr instead), warnings and
// errors also on stderr, except the raft library's below ERROR. It
// returns the file's path ("" for "-") and a close function.
func serveLogger(c *cli.Context, data string) (*slog.Logger, string, func(), error) {
	lvl, err := parseLevel(c.String("log-level"))
	if err != nil {
		return nil, "", nil, err
	}
	format := c.String("log-format")
	path := c.String("log-file")
	if path == "-" {
		h, err := newHandler(os.Stderr, format, lvl)
		if err != nil {
			return nil, "", nil, err
		}
		return slog.New(h), "", func() {}, nil
	}
	if _, err := newHandler(io.Discard, format, lvl); err != nil {
		return nil, "", nil, err
	}
	if path == "" {
		path = filepath.Join(data, "blockd.log")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, "", nil, fmt.Errorf("--log-file %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, "", nil, fmt.Errorf("--log-file %s: %w (give --log-file PATH, or - for the terminal)", path, err)
	}
	fileH, _ := newHandler(f, format, lvl)
	termLvl := max(lvl, slog.LevelWarn)
	termH, _ := newHandler(os.Stderr, format, termLvl)
	return slog.New(fanout{fileH, quietRaft{termH}}), path, func() { f.Close() }, nil
}

// fanout sends each record to every handler that takes its level.
type fanout []slog.Handler

func (f fanout) Enabled(ctx context.Context, l slog.Level) bool {
	for _, h := range f {
		if h.Enabled(ctx, l) {
			return true
		}
	}
	return false
}

func (f fanout) Handle(ctx context.Context, r slog.Record) error {
	var errs []error
	for _, h := range f {
		if h.Enabled(ctx, r.Level) {
			errs = append(errs, h.Handle(ctx, r.Clone()))
		}
	}
	return errors.Join(errs...)
}

func (f fanout) WithAttrs(a []slog.Attr) slog.Handler {
	out := make(fanout, len(f))
	for i, h := range f {
		out[i] = h.WithAttrs(a)
	}
	return out
}

func (f fanout) WithGroup(name string) slog.Handler {
	out := make(fanout, len(f))
	for i, h := range f {
		out[i] = h.WithGroup(name)
	}
	return out
}

// quietRaft drops the raft library's own lines (event "raft") below ERROR.
type quietRaft struct{ slog.Handler }

func (q quietRaft) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "raft" && r.Level < slog.LevelError {
		return nil
	}
	return q.Handler.Handle(ctx, r)
}

func (q quietRaft) WithAttrs(a []slog.Attr) slog.Handler { return quietRaft{q.Handler.WithAttrs(a)} }
func (q quietRaft) WithGroup(n string) slog.Handler      { return quietRaft{q.Handler.WithGroup(n)} }
