package layering

import (
	"os/exec"
	"sort"
	"strings"
	"testing"

	"github.com/blockd/blockd/internal/testenv"
)

const module = "github.com/blockd/blockd"

// allowed lists, for every package of the module, the packages of the
// module its non-test code may import (docs/ARCHITECTURE.md, section 1).
// "*" allows anything (the CLI and test/benchmark programs).
var allowed = map[string][]string{
	"cmd/blockd":        {"*"},
	"server":            {"replication", "blockvol", "nbd", "ublk", "api", "blockdev", "vfs", "tlsauth", "image"},
	"master":            {"api", "tlsauth", "vfs"},
	"csi":               {"api", "nbd/kernel", "tlsauth"},
	"replication":       {"blockvol", "wal", "blockdev", "vfs"},
	"blockvol":          {"wal", "vfs", "blockdev"},
	"nbd":               {"blockdev", "nbd/wire"},
	"nbd/wire":          {},
	"nbd/client":        {"blockdev", "nbd/kernel", "nbd/wire"},
	"ublk":              {"blockdev", "ublk/uring"},
	"ublk/uring":        {},
	"nbd/kernel":        {"nbd/wire"},
	"api":               {},
	"tlsauth":           {},
	"wal":               {},
	"image":             {},
	"vfs":               {},
	"blockdev":          {},
	"internal/testenv":  {},
	"internal/layering": {},
	"bench/":            {"*"},
	"tests/":            {"*"},
	"vagrant":           {"*"},
}

func rule(pkg string) ([]string, bool) {
	if r, ok := allowed[pkg]; ok {
		return r, true
	}
	for k, r := range allowed {
		if strings.HasSuffix(k, "/") && strings.HasPrefix(pkg, k) {
			return r, true
		}
	}
	return nil, false
}

// TestImportRule: no package imports upward or sideways past the table
// above, and every package of the module has a rule (a new package must
// be placed in the layering on purpose).
func TestImportRule(t *testing.T) {
	goTool := testenv.RequireTool(t, "go")
	cmd := exec.Command(goTool, "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", module+"/...")
	cmd.Dir = "../.."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var bad []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := strings.TrimPrefix(strings.TrimPrefix(f[0], module), "/")
		ok, known := rule(pkg)
		if !known {
			bad = append(bad, pkg+": no layering rule")
			continue
		}
		set := map[string]bool{}
		for _, a := range ok {
			set[a] = true
		}
		if set["*"] {
			continue
		}
		for _, imp := range f[1:] {
			dep, mine := strings.CutPrefix(imp, module+"/")
			if mine && !set[dep] {
				bad = append(bad, pkg+" imports "+dep)
			}
		}
	}
	sort.Strings(bad)
	for _, b := range bad {
		t.Error(b)
	}
}
