package replication

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/blockvol"
)

// The replica of BenchmarkReplicationTax runs in a child process (this
// test binary, re-executed with benchChildEnv set), so that the CPU the
// replica spends is its own process's and the primary's is the
// benchmark's: getrusage of each, sampled around the measured phase.
const (
	benchChildEnv     = "BLOCKD_BENCH_REPLICA_CHILD"      // the replica volume's directory
	benchChildProfEnv = "BLOCKD_BENCH_REPLICA_CPUPROFILE" // the child's CPU profile of the measured phase
	benchChildBatch   = "BLOCKD_BENCH_REPLICA_BATCH"      // the child's batchRecs (1: one record at a time)
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(benchChildEnv); dir != "" {
		os.Exit(replicaChild(dir))
	}
	os.Exit(m.Run())
}

// cpuMicros is this process's user+system CPU time in µs.
func cpuMicros() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano()/1000 + ru.Stime.Nano()/1000
}

// replicaChild serves one replica volume: it prints its address, then
// answers "begin"/"end" lines on stdin with its CPU time in µs and its
// volume's group commits and the records they covered (and
// starts/stops its CPU profile when benchChildProfEnv names a file) and
// exits at EOF.
func replicaChild(dir string) int {
	const size = 1 << 30
	if s := os.Getenv(benchChildBatch); s != "" {
		fmt.Sscan(s, &batchRecs)
	}
	rv, err := blockvol.Create(dir, blockvol.Options{Size: size})
	if err != nil {
		fmt.Fprintln(os.Stderr, "replica child:", err)
		return 1
	}
	<-rv.WALFilled()
	rec := NewReceiver(ReceiverConfig{ServerID: "r", Logger: quietLog(), Lookup: func(string) (ReplicaTarget, bool) {
		return ReplicaTarget{Vol: rv, Epoch: 1, PrimaryID: testPrimaryID}, true
	}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "replica child:", err)
		return 1
	}
	go rec.Serve(ln)
	fmt.Println(ln.Addr().String())
	var prof *os.File
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		switch sc.Text() {
		case "begin":
			if p := os.Getenv(benchChildProfEnv); p != "" && prof == nil {
				if prof, err = os.Create(p); err == nil {
					pprof.StartCPUProfile(prof)
				}
			}
		case "end":
			if prof != nil {
				pprof.StopCPUProfile()
				prof.Close()
				prof = nil
				os.Setenv(benchChildProfEnv, "") // one profile: the first measured phase
			}
		}
		st := rv.Stats()
		fmt.Println(cpuMicros(), st.GroupCommits, st.GroupCommitRecords)
	}
	rec.Close()
	rv.Close()
	return 0
}

// replicaProc is the benchmark's handle on a child replica.
type replicaProc struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Scanner
	addr string
}

func startReplicaProc(b *testing.B, dir, prof string, env ...string) *replicaProc {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), benchChildEnv+"="+dir, benchChildProfEnv+"="+prof), env...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	rp := &replicaProc{cmd: cmd, in: in, out: bufio.NewScanner(out)}
	if !rp.out.Scan() {
		cmd.Process.Kill()
		cmd.Wait()
		b.Fatalf("replica child printed no address: %v", rp.out.Err())
	}
	rp.addr = strings.TrimSpace(rp.out.Text())
	return rp
}

// childSample is what the child answers: its CPU µs and its volume's
// group commits (WAL fdatasyncs) and the records they covered.
type childSample struct {
	us, syncs, syncRecs int64
}

// cpu sends cmd ("begin" or "end") and returns the child's sample.
func (rp *replicaProc) cpu(b *testing.B, cmd string) childSample {
	fmt.Fprintln(rp.in, cmd)
	if !rp.out.Scan() {
		b.Fatalf("replica child: no answer to %s: %v", cmd, rp.out.Err())
	}
	var c childSample
	fmt.Sscan(rp.out.Text(), &c.us, &c.syncs, &c.syncRecs)
	return c
}

func (rp *replicaProc) stop(b *testing.B) {
	rp.in.Close()
	if err := rp.cmd.Wait(); err != nil {
		b.Errorf("replica child: %v", err)
	}
}

// taxRun is one measured phase: IOPS and CPU µs per write of the
// primary's process and of the replica's, and where the flushes' time
// went (see BenchmarkReplicationTax).
type taxRun struct {
	iops, primaryUS, replicaUS float64
	flushUS, localUS, waitUS   float64 // mean per flush: all of it, the local fdatasync, the wait after it
	barrierUS                  float64 // mean per measured barrier
	replicaSyncs, syncRecs     int64   // the replica's group commits and their records
}

// runRF2 measures RF=2 in mode against a replica in a child process
// (inproc: in this process, for comparison; then the replica's CPU is
// not separable and is reported as 0).
func runRF2(b *testing.B, mode Durability, ops int, inproc bool, prof string) taxRun {
	const size = 1 << 30
	pv := benchVol(b, size)
	var addr string
	var rp *replicaProc
	var rec *Receiver
	if inproc {
		rv := benchVolIn(b, replicaBenchDir(b), size)
		rec = NewReceiver(ReceiverConfig{ServerID: "r", Logger: quietLog(), Lookup: func(string) (ReplicaTarget, bool) {
			return ReplicaTarget{Vol: rv, Epoch: 1, PrimaryID: testPrimaryID}, true
		}})
		ln := mustListen(b)
		go rec.Serve(ln)
		addr = ln.Addr().String()
	} else {
		var rprof string
		if prof != "" {
			rprof = prof + ".replica"
		}
		rp = startReplicaProc(b, replicaBenchDir(b), rprof)
		addr = rp.addr
	}
	p, err := NewPrimary(pv, PrimaryConfig{Volume: "bench", ServerID: testPrimaryID, Epoch: 1, Durability: mode, Replicas: []Peer{{"r", addr}}, Logger: quietLog()})
	if err != nil {
		b.Fatal(err)
	}
	benchWaitInSync(b, p)
	randWriteQD32(b, p, 2000) // warm
	var pf *os.File
	if prof != "" {
		if pf, err = os.Create(prof + ".primary"); err == nil {
			pprof.StartCPUProfile(pf)
		}
	}
	var r0, r1 childSample
	if rp != nil {
		r0 = rp.cpu(b, "begin")
	}
	n0, l0, w0 := p.flushTime.n.Load(), p.flushTime.localNs.Load(), p.flushTime.waitNs.Load()
	b0 := p.Replicas()[0].Barrier
	c0 := cpuMicros()
	iops, flushUS := randWriteQD32Flush(b, p, ops)
	c1 := cpuMicros()
	b1 := p.Replicas()[0].Barrier
	n1, l1, w1 := p.flushTime.n.Load(), p.flushTime.localNs.Load(), p.flushTime.waitNs.Load()
	if rp != nil {
		r1 = rp.cpu(b, "end")
	}
	if pf != nil {
		pprof.StopCPUProfile()
		pf.Close()
	}
	p.Close()
	if rec != nil {
		rec.Close()
	}
	if rp != nil {
		rp.stop(b)
	}
	pv.Close()
	tr := taxRun{iops: iops, primaryUS: float64(c1-c0) / float64(ops), replicaUS: float64(r1.us-r0.us) / float64(ops),
		flushUS: flushUS, replicaSyncs: r1.syncs - r0.syncs, syncRecs: r1.syncRecs - r0.syncRecs}
	if n := n1 - n0; n > 0 {
		tr.localUS, tr.waitUS = float64(l1-l0)/float64(n)/1e3, float64(w1-w0)/float64(n)/1e3
	}
	if n := b1.Count - b0.Count; n > 0 {
		tr.barrierUS = (b1.SumSec - b0.SumSec) / float64(n) * 1e6
	}
	return tr
}

// BenchmarkReplicationTax: 4k randwrite QD32, flush every 32 writes, RF=2
// over loopback (sync_all and best_effort) against RF=1 (the bare
// volume) in the same run. Rounds alternate RF=1, RF=2 sync_all and RF=2
// best_effort on fresh volumes (the disk of a shared VM drifts); the
// median of each ratio is reported. Both volumes of RF=2 share this
// machine's disk and cores unless BLOCKD_BENCH_REPLICA_DIR points the
// replica elsewhere.
//
// The replica runs in a child process, so each side's CPU is measured
// by getrusage of its own process around the measured phase and printed
// per replicated write (µs): the primary's figure includes the 32 writer
// goroutines of the benchmark itself (a small loop) and both include
// their volume's flusher. Over loopback the kernel may process part of
// the receive side of TCP in the sender's context, so some of the
// replica's network cost can be charged to the primary. Both volumes are
// fresh, and the benchmark waits for their WALs' zero fill (blockvol's
// walfill.go) before it measures, so each fdatasync finds its WAL
// written, as in a WAL's later laps. BLOCKD_BENCH_REPLICA_INPROC=1 runs the replica
// in this process instead (the CPU split is then not available).
// BLOCKD_BENCH_CPUPROFILE=prefix writes prefix.primary and
// prefix.replica: CPU profiles of the first sync_all phase.
// BLOCKD_BENCH_OPS sets the writes of each measured phase (40,000).
//
// Each sync_all round also prints where a flush's time goes: the
// primary's local fdatasync, then its wait for the replica's answer
// after it; the barrier round trip as the primary measures it (send to
// answer, a sample of one outstanding barrier at a time); and the
// replica's WAL fdatasyncs in the phase (its group commits) with the
// records each covered.
func BenchmarkReplicationTax(b *testing.B) {
	ops := 40000
	if s := os.Getenv("BLOCKD_BENCH_OPS"); s != "" {
		fmt.Sscan(s, &ops)
	}
	rounds := 3
	if s := os.Getenv("BLOCKD_BENCH_ROUNDS"); s != "" {
		fmt.Sscan(s, &rounds)
	}
	inproc := os.Getenv("BLOCKD_BENCH_REPLICA_INPROC") != ""
	prof := os.Getenv("BLOCKD_BENCH_CPUPROFILE")
	var syncR, beR, rf1s, syncs, bes, pUS, rUS, rf1US []float64
	for i := 0; i < b.N*rounds; i++ {
		v1 := benchVol(b, 1<<30)
		randWriteQD32(b, v1, 2000) // warm
		c0 := cpuMicros()
		rf1, rf1Flush := randWriteQD32Flush(b, v1, ops)
		rf1cpu := float64(cpuMicros()-c0) / float64(ops)
		v1.Close()

		sa := runRF2(b, SyncAll, ops, inproc, prof)
		prof = ""
		be := runRF2(b, BestEffort, ops, inproc, "")
		fmt.Printf("round %d: RF=1 %.0f IOPS (%.1f µs CPU/write); RF=2 sync_all %.0f IOPS, ratio %.2f, CPU/write primary %.1f µs replica %.1f µs (%.2fx); RF=2 best_effort %.0f IOPS, ratio %.2f\n",
			i, rf1, rf1cpu, sa.iops, sa.iops/rf1, sa.primaryUS, sa.replicaUS, sa.replicaUS/sa.primaryUS, be.iops, be.iops/rf1)
		fmt.Printf("round %d: flush latency: RF=1 %.0f µs; sync_all %.0f µs = local fdatasync %.0f µs, then the replica %.0f µs; barrier round trip %.0f µs; replica fdatasyncs %d (%.0f records each)\n",
			i, rf1Flush, sa.flushUS, sa.localUS, sa.waitUS, sa.barrierUS, sa.replicaSyncs, float64(sa.syncRecs)/float64(max(sa.replicaSyncs, 1)))
		rf1s, syncs, bes = append(rf1s, rf1), append(syncs, sa.iops), append(bes, be.iops)
		syncR, beR = append(syncR, sa.iops/rf1), append(beR, be.iops/rf1)
		pUS, rUS, rf1US = append(pUS, sa.primaryUS), append(rUS, sa.replicaUS), append(rf1US, rf1cpu)
	}
	med := func(x []float64) float64 {
		x = slices.Clone(x)
		slices.Sort(x)
		return x[len(x)/2]
	}
	b.ReportMetric(med(rf1s), "rf1_iops")
	b.ReportMetric(med(syncs), "rf2_iops")
	b.ReportMetric(med(syncR), "rf2/rf1")
	b.ReportMetric(med(beR), "rf2be/rf1")
	b.ReportMetric(med(pUS), "primary_us/write")
	b.ReportMetric(med(rUS), "replica_us/write")
	where := "replica in a child process"
	if inproc {
		where = "replica in this process: CPU split not measured"
	}
	fmt.Printf("replication tax (median of %d rounds, %s): RF=1 %.0f IOPS; RF=2 sync_all %.0f IOPS, ratio %.2f (goal >= 0.60); RF=2 best_effort %.0f IOPS, ratio %.2f\n",
		len(syncR), where, med(rf1s), med(syncs), med(syncR), med(bes), med(beR))
	fmt.Printf("CPU per replicated write (sync_all, median): primary %.1f µs, replica %.1f µs, replica/primary %.2f (goal <= 0.50); RF=1 %.1f µs\n",
		med(pUS), med(rUS), med(rUS)/med(pUS), med(rf1US))
}

// BenchmarkReceiverApply: the replica's own CPU per 4 KiB record, batched
// apply against one record at a time (batchRecs=1) in the same run, with
// the receiver in a child process fed pre-framed records over loopback:
// groups of 32 records and a barrier, as sync_all's flushes make them,
// the answers read as they come. Rounds alternate the two modes on fresh
// volumes; the medians are reported. BLOCKD_BENCH_CPUPROFILE=prefix
// writes prefix.apply, the batched replica's CPU profile of round 0.
func BenchmarkReceiverApply(b *testing.B) {
	const ops, group = 40000, 32
	rounds := 3
	if s := os.Getenv("BLOCKD_BENCH_ROUNDS"); s != "" {
		fmt.Sscan(s, &rounds)
	}
	prof := os.Getenv("BLOCKD_BENCH_CPUPROFILE") // prefix: the batched replica's profile of round 0
	run := func(batch int) (usPerRec, recPerSec float64) {
		var rprof string
		if batch > 1 && prof != "" {
			rprof, prof = prof+".apply", ""
		}
		rp := startReplicaProc(b, replicaBenchDir(b), rprof, fmt.Sprintf("%s=%d", benchChildBatch, batch))
		defer rp.stop(b)
		c, err := net.Dial("tcp", rp.addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		mr := NewMsgReader(c)
		frame := func(dst *bytes.Buffer, m *Msg) {
			m.Volume, m.Epoch, m.Session = "bench", 1, 1
			if err := WriteFrame(dst, m); err != nil {
				b.Fatal(err)
			}
		}
		var hb bytes.Buffer
		frame(&hb, &Msg{Type: MsgHello, Payload: Hello{PrimaryID: testPrimaryID, TargetServerID: "r", RegionSize: 65536}.Encode()})
		if _, err := c.Write(hb.Bytes()); err != nil {
			b.Fatal(err)
		}
		if m, err := mr.Read(); err != nil || m.Type != MsgHelloResp {
			b.Fatalf("hello: %v %v", m, err)
		}
		done := make(chan error, 1)
		go func() {
			for {
				m, err := mr.Read()
				if err != nil {
					done <- err
					return
				}
				if m.Type != MsgBarrierResp {
					done <- fmt.Errorf("replica answered %s", m.Type)
					return
				}
				if m.LSNTo >= ops {
					done <- nil
					return
				}
			}
		}()
		data := make([]byte, 4096)
		blocks := int64(1<<30) / 4096
		var buf bytes.Buffer
		r0 := rp.cpu(b, "begin")
		start := time.Now()
		for lsn := uint64(1); lsn <= ops; {
			buf.Reset()
			for k := 0; k < group && lsn <= ops; k, lsn = k+1, lsn+1 {
				data[0], data[1] = byte(lsn), byte(lsn>>8)
				frame(&buf, &Msg{Type: MsgRecord, LSNFrom: lsn, LSNTo: lsn, Payload: RecordBody{Type: RecWrite, Epoch: 1,
					Offset: int64(lsn*7919) % blocks * 4096, Length: 4096, Data: data}.Encode(nil)})
			}
			frame(&buf, &Msg{Type: MsgBarrier, LSNTo: lsn - 1})
			if _, err := c.Write(buf.Bytes()); err != nil {
				b.Fatal(err)
			}
		}
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		el := time.Since(start)
		r1 := rp.cpu(b, "end")
		return float64(r1.us-r0.us) / ops, ops / el.Seconds()
	}
	var bUS, sUS, bRate, sRate []float64
	for i := 0; i < b.N*rounds; i++ {
		u1, t1 := run(1)
		u2, t2 := run(batchRecs)
		fmt.Printf("round %d: replica CPU per record: one at a time %.2f µs (%.0f records/s), batched %.2f µs (%.0f records/s), ratio %.2f\n", i, u1, t1, u2, t2, u2/u1)
		sUS, bUS, sRate, bRate = append(sUS, u1), append(bUS, u2), append(sRate, t1), append(bRate, t2)
	}
	med := func(x []float64) float64 {
		x = slices.Clone(x)
		slices.Sort(x)
		return x[len(x)/2]
	}
	b.ReportMetric(med(sUS), "single_us/rec")
	b.ReportMetric(med(bUS), "batch_us/rec")
	fmt.Printf("replica apply (median of %d rounds): one at a time %.2f µs/record %.0f records/s; batched %.2f µs/record %.0f records/s; CPU ratio %.2f\n",
		len(bUS), med(sUS), med(sRate), med(bUS), med(bRate), med(bUS)/med(sUS))
}
