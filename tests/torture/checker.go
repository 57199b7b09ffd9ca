package torture

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/anishathalye/porcupine"
)

// Result is what Check found.
type Result struct {
	Ops        int // per-block operations checked (a flush counts once per block)
	ClientOps  int // recorded client operations
	Blocks     int
	Verdict    porcupine.CheckResult
	BadBlock   int64  // the first block whose partition is not linearizable
	BadOps     int    // operations in the minimal failing sub-history
	Artifacts  string // directory with the saved failure, if any
	LostBlocks []int64
}

// Linearizable is true when every partition was checked Ok.
func (r Result) Linearizable() bool { return r.Verdict == porcupine.Ok }

// Check checks a history partition by partition. On a violation it saves
// the seed, the whole history, the minimal failing sub-history (a prefix of
// the failing block's partition) and porcupine's visualisation of it under
// dir, and names the directory in Result.Artifacts. timeout bounds each
// partition's check (0: none); a partition that times out makes the
// verdict Unknown.
func Check(history []Op, seed int64, dir string, timeout time.Duration) (Result, error) {
	blocks, parts := Partition(history)
	res := Result{Blocks: len(blocks), ClientOps: len(history), Verdict: porcupine.Ok, BadBlock: -1}
	model := BlockModel()
	for i, p := range parts {
		res.Ops += len(p)
		v := porcupine.CheckOperationsTimeout(model, p, timeout)
		if v == porcupine.Ok {
			continue
		}
		if v == porcupine.Unknown {
			res.Verdict = porcupine.Unknown
			continue
		}
		res.Verdict = porcupine.Illegal
		res.BadBlock = blocks[i]
		min := minimalPrefix(model, p, timeout)
		res.BadOps = len(min)
		out, err := saveFailure(dir, seed, blocks[i], history, min, model, timeout)
		res.Artifacts = out
		if err != nil {
			return res, err
		}
		break
	}
	return res, nil
}

// minimalPrefix returns the shortest prefix (by invocation time) of a
// failing partition that still fails, found by bisection; every prefix it
// returns has itself been checked Illegal.
func minimalPrefix(model porcupine.Model, p []porcupine.Operation, timeout time.Duration) []porcupine.Operation {
	p = append([]porcupine.Operation(nil), p...)
	sort.SliceStable(p, func(i, j int) bool { return p[i].Call < p[j].Call })
	lo, hi := 0, len(p)
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if porcupine.CheckOperationsTimeout(model, p[:mid], timeout) == porcupine.Illegal {
			hi = mid
		} else {
			lo = mid
		}
	}
	return p[:hi]
}

// ArtifactDir is where failures are saved: $TORTURE_ARTIFACTS, or
// blockd-torture-artifacts under the system temp directory (t.TempDir
// would be deleted with the test).
func ArtifactDir() string {
	if d := os.Getenv("TORTURE_ARTIFACTS"); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), "blockd-torture-artifacts")
}

type savedOp struct {
	Client int         `json:"client"`
	Call   int64       `json:"call_ns"`
	Return int64       `json:"return_ns"`
	Op     string      `json:"op"`
	Input  BlockInput  `json:"input"`
	Output BlockOutput `json:"output"`
}

func saveFailure(dir string, seed int64, block int64, history []Op, min []porcupine.Operation,
	model porcupine.Model, timeout time.Duration) (string, error) {
	out := filepath.Join(dir, fmt.Sprintf("seed-%d-%s", seed, time.Now().UTC().Format("20060102T150405.000")))
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", fmt.Errorf("artifact dir: %w", err)
	}
	if err := os.WriteFile(filepath.Join(out, "seed"), fmt.Appendf(nil, "%d\n", seed), 0o644); err != nil {
		return out, fmt.Errorf("save seed: %w", err)
	}
	if err := writeJSON(filepath.Join(out, "history.json"), history); err != nil {
		return out, err
	}
	var ops []savedOp
	for _, o := range min {
		ops = append(ops, savedOp{Client: o.ClientId, Call: o.Call, Return: o.Return,
			Op: model.DescribeOperation(o.Input, o.Output), Input: o.Input.(BlockInput), Output: o.Output.(BlockOutput)})
	}
	if err := writeJSON(filepath.Join(out, fmt.Sprintf("block-%d-minimal.json", block)), ops); err != nil {
		return out, err
	}
	_, info := porcupine.CheckOperationsVerbose(model, min, timeout)
	if err := porcupine.VisualizePath(model, info, filepath.Join(out, fmt.Sprintf("block-%d.html", block))); err != nil {
		return out, fmt.Errorf("visualize: %w", err)
	}
	return out, nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", filepath.Base(path), err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("save %s: %w", filepath.Base(path), err)
	}
	return nil
}

// LostFlushed returns the blocks whose final value (final maps a block to
// the tag read after the run, everything healed) is older than a write to
// that block that completed before a successful flush began: an
// acknowledged, flushed write that was lost. Blocks not in final are not
// judged.
func LostFlushed(history []Op, final map[int64]uint64) []int64 {
	var flushCalls []int64
	for _, op := range history {
		if op.Kind == KindFlush && op.Outcome == OK {
			flushCalls = append(flushCalls, op.Call)
		}
	}
	sort.Slice(flushCalls, func(i, j int) bool { return flushCalls[i] < flushCalls[j] })
	// durable: a completed write with a successful flush invoked after it
	// returned.
	durable := func(ret int64) bool {
		i := sort.Search(len(flushCalls), func(i int) bool { return flushCalls[i] > ret })
		return i < len(flushCalls)
	}
	type w struct{ call, ret int64 }
	writes := map[uint64]w{}
	latestDurableCall := map[int64]int64{}
	hasDurable := map[int64]bool{}
	for _, op := range history {
		if op.Kind != KindWrite {
			continue
		}
		for i := 0; i < op.Count; i++ {
			writes[op.Tags[i]] = w{op.Call, op.Return}
			b := op.Block + int64(i)
			if op.Outcome == OK && durable(op.Return) {
				if !hasDurable[b] || op.Call > latestDurableCall[b] {
					latestDurableCall[b] = op.Call
				}
				hasDurable[b] = true
			}
		}
	}
	var lost []int64
	for b, tag := range final {
		if !hasDurable[b] {
			continue
		}
		fw, known := writes[tag]
		// The final value must not have completed before the latest
		// durable write began (then it is older in real time).
		if tag == 0 || !known || fw.ret < latestDurableCall[b] {
			lost = append(lost, b)
		}
	}
	sort.Slice(lost, func(i, j int) bool { return lost[i] < lost[j] })
	return lost
}
