// Package vagrant holds the Vagrant cluster (Vagrantfile, provision/). Its
// tests check the syntax here; tests/vm/nbdkern runs the provisioning
// scripts for real inside a QEMU guest.
package vagrant

import (
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/blockd/blockd/internal/testenv"
)

func TestVagrantfileSyntax(t *testing.T) {
	ruby := testenv.RequireTool(t, "ruby")
	out, err := exec.Command(ruby, "-c", "Vagrantfile").CombinedOutput()
	if err != nil {
		t.Fatalf("ruby -c Vagrantfile: %v\n%s", err, out)
	}
}

func TestProvisionScriptsSyntax(t *testing.T) {
	bash := testenv.RequireTool(t, "bash")
	scripts, _ := filepath.Glob("provision/*.sh")
	if len(scripts) < 5 {
		t.Fatalf("found %d provisioning scripts", len(scripts))
	}
	for _, s := range scripts {
		if out, err := exec.Command(bash, "-n", s).CombinedOutput(); err != nil {
			t.Errorf("bash -n %s: %v\n%s", s, err, out)
		}
	}
	if sc, err := exec.LookPath("shellcheck"); err == nil {
		args := append([]string{"-x", "-S", "warning"}, scripts...)
		if out, err := exec.Command(sc, args...).CombinedOutput(); err != nil {
			t.Errorf("shellcheck: %v\n%s", err, out)
		}
	}
}
