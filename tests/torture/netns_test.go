package torture

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// netLab puts each volume server in its own network namespace, linked by
// a veth pair to a bridge in the test's namespace (where the master and
// the clients are). Setting a server's veth down is a real partition: the
// server loses the master, the other servers and the clients at once,
// with no RST (connections hang, as on a real network).
type netLab struct {
	t      testing.TB
	prefix string // unique per run: interface and namespace names
	bridge string
	hostIP string
	ips    map[string]string // server ID -> its address
	up     map[string]bool
}

// netLabAvailable: root and ip(8) that can make a bridge.
func netLabAvailable() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("not root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return err
	}
	return nil
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func newNetLab(t testing.TB, ids []string) *netLab {
	var b [2]byte
	_, _ = rand.Read(b[:])
	tag := hex.EncodeToString(b[:])
	// A /24 per run from the tag, so parallel runs do not collide.
	subnet := fmt.Sprintf("10.%d.%d", 100+int(b[0])%100, b[1])
	n := &netLab{t: t, prefix: "bdt" + tag, bridge: "bdt" + tag + "br", hostIP: subnet + ".1",
		ips: map[string]string{}, up: map[string]bool{}}
	t.Cleanup(n.close)
	steps := [][]string{
		{"link", "add", n.bridge, "type", "bridge"},
		{"addr", "add", n.hostIP + "/24", "dev", n.bridge},
		{"link", "set", n.bridge, "up"},
	}
	for i, id := range ids {
		ns, veth := n.ns(id), n.veth(id)
		ip := fmt.Sprintf("%s.%d", subnet, 11+i)
		n.ips[id] = ip
		steps = append(steps,
			[]string{"netns", "add", ns},
			[]string{"link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns},
			[]string{"link", "set", veth, "master", n.bridge},
			[]string{"link", "set", veth, "up"},
			[]string{"-n", ns, "addr", "add", ip + "/24", "dev", "eth0"},
			[]string{"-n", ns, "link", "set", "eth0", "up"},
			[]string{"-n", ns, "link", "set", "lo", "up"},
		)
		n.up[id] = true
	}
	for _, s := range steps {
		if err := ipCmd(s...); err != nil {
			t.Fatalf("network lab: %v", err)
		}
	}
	return n
}

func (n *netLab) ns(id string) string   { return n.prefix + id }
func (n *netLab) veth(id string) string { return n.prefix + id + "v" }

// exec is the command prefix that runs a program in id's namespace.
func (n *netLab) exec(id string) []string { return []string{"ip", "netns", "exec", n.ns(id)} }

// setLink cuts (up=false) or heals a server's only link.
func (n *netLab) setLink(id string, up bool) error {
	state := "down"
	if up {
		state = "up"
	}
	if err := ipCmd("link", "set", n.veth(id), state); err != nil {
		return err
	}
	n.up[id] = up
	return nil
}

func (n *netLab) close() {
	for id := range n.ips {
		_ = ipCmd("netns", "del", n.ns(id)) // takes its end of the veth with it
		_ = ipCmd("link", "del", n.veth(id))
	}
	_ = ipCmd("link", "del", n.bridge)
}
