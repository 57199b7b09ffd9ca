package csi

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	"github.com/onsi/gomega"
)

// EnvSanityEndpoint, when set, points TestSanity at a running driver
// (`blockd csi --mode both` in the kernel guest, tests/vm/csi) and runs
// the whole suite, node service included. Unset, TestSanity starts a real
// master and two volume servers on loopback and a driver in controller
// mode in this process, and skips the node service (this host has no nbd
// driver; the guest runs it). The suite talks to the node service even in
// controller tests (NodeGetInfo, and NodeUnpublish/NodeUnstage in every
// cleanup), so the host serves it the way Kubernetes deploys the driver: a
// controller-mode driver at ControllerAddress and a node-mode one at
// Address, both in this process; the node calls the controller tests
// make need no kernel (nothing is staged).
const EnvSanityEndpoint = "BLOCKD_CSI_SANITY_ENDPOINT"

// TestSanity runs the Kubernetes project's CSI sanity suite
// (csi-test/v5 pkg/sanity) against the driver and logs its counts:
// passed, skipped (each with its reason) and failed.
func TestSanity(t *testing.T) {
	if testing.Short() {
		t.Skip("the sanity suite starts real blockd processes; skipped in -short mode")
	}
	endpoint := os.Getenv(EnvSanityEndpoint)
	node := endpoint != ""
	cfg := sanity.NewTestConfig()
	cfg.Address = endpoint
	if !node {
		c := newCluster(t, 2)
		cfg.ControllerAddress, _ = startDriver(t, []string{c.master}, ModeController)
		cfg.Address, _ = startDriver(t, []string{c.master}, ModeNode)
	}
	work := t.TempDir()
	cfg.TargetPath = filepath.Join(work, "target")
	cfg.StagingPath = filepath.Join(work, "staging")
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeExpandSize = 96 << 20
	// A small WAL per volume keeps the servers' disks small; it also
	// sends a StorageClass parameter through every create.
	cfg.TestVolumeParameters = map[string]string{ParamWALSize: "4194304"}
	cfg.IdempotentCount = 3
	sc := sanity.GinkgoTest(&cfg)

	suite, rep := ginkgo.GinkgoConfiguration()
	if !node {
		suite.SkipStrings = append(suite.SkipStrings, "Node Service")
	}
	suite.Timeout = 0
	rep.NoColor = true
	var counts struct{ passed, skipped, failed int }
	var skips, fails []string
	ginkgo.ReportAfterSuite("blockd sanity counts", func(r ginkgo.Report) {
		for _, s := range r.SpecReports {
			if s.LeafNodeType != types.NodeTypeIt {
				continue
			}
			name := strings.TrimSpace(strings.Join(s.ContainerHierarchyTexts, " ") + " " + s.LeafNodeText)
			switch {
			case s.State == types.SpecStatePassed:
				counts.passed++
			case s.State == types.SpecStateSkipped || s.State == types.SpecStatePending:
				counts.skipped++
				why := s.Failure.Message
				switch {
				case why != "":
				case !node && strings.HasPrefix(name, "Node Service"):
					why = "node service: this host has no nbd driver; tests/vm/csi runs these specs in the 6.12 guest"
				case s.State == types.SpecStatePending:
					why = "disabled in the suite itself (XIt upstream, csi-test issue 223)"
				default:
					why = "not selected (" + s.State.String() + ")"
				}
				skips = append(skips, name+": "+why)
			default:
				counts.failed++
				fails = append(fails, name+": "+s.Failure.Message)
			}
		}
	})
	gomega.RegisterFailHandler(ginkgo.Fail)
	ok := ginkgo.RunSpecs(t, "blockd CSI sanity", suite, rep)
	sc.Finalize()
	sort.Strings(skips)
	for _, s := range skips {
		t.Logf("sanity skipped: %s", s)
	}
	for _, f := range fails {
		t.Logf("sanity failed: %s", f)
	}
	t.Logf("sanity counts (node service %v): passed=%d skipped=%d failed=%d", node, counts.passed, counts.skipped, counts.failed)
	if !ok || counts.failed > 0 {
		t.Fatalf("sanity suite failed: %d failures", counts.failed)
	}
	if counts.passed == 0 {
		t.Fatal("sanity suite ran nothing")
	}
}
