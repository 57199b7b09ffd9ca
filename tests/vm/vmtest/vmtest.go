// Package vmtest boots Debian 12's 6.12 kernel under qemu (TCG) with a small
// busybox initramfs and runs a shell script inside the guest, so tests can
// use the real nbd and ublk_drv drivers on a host whose kernel has neither.
//
// The kernel package is fetched once with apt-get download and cached with
// the needed modules (decompressed, dependency-ordered) and a base initramfs
// layer (busybox, nbd-client, e2fsprogs, the modules, /init) under
// CacheDir(). Every boot appends a small per-run layer holding the guest
// script, the binaries and files the test asks for, and any extra host tools
// (for example fio) with their shared libraries.
//
// Typical use:
//
//	blockd := vmtest.BuildBlockd(t)
//	res := vmtest.Boot(t, vmtest.Guest{
//		Binaries: map[string]string{"/usr/local/bin/blockd": blockd},
//		Script:   "blockd --help\nmkfs.ext4 -q /dev/nbd0 || true\n",
//	})
//	if res.ExitCode != 0 { t.Fatalf(...) }
//
// Inside the guest: root, PATH with /usr/local/bin first, /tmp and /run are
// tmpfs, lo is up (127.0.0.1), the modules in Guest.Modules are loaded (nbd
// gives /dev/nbd0..15), the script runs with `sh -e` from /root with stdin
// from /dev/null; its exit status is the Result's ExitCode.
package vmtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
)

// Guest describes one boot.
type Guest struct {
	// Script is the shell script the guest runs (busybox sh, with -e).
	Script string
	// Binaries maps guest paths to host files copied into the guest
	// (mode kept), e.g. {"/usr/local/bin/blockd": BuildBlockd(t)}.
	Binaries map[string]string
	// Files maps guest paths to contents (mode 0755 if the path is under a
	// bin directory, else 0644).
	Files map[string][]byte
	// Tools are extra host executables (names looked up in PATH and the
	// sbin dirs, or absolute paths) copied with their shared libraries
	// to the same paths, e.g. []string{"fio"}.
	Tools []string
	// Env is exported to the script.
	Env map[string]string
	// Modules to insmod at boot; nil means DefaultModules, an empty non-nil
	// slice loads none. Each must be one of AvailableModules.
	Modules []string
	// MemoryMiB is the guest RAM (default 1024); the initramfs and /tmp
	// live in it. CPUs defaults to 2.
	MemoryMiB int
	CPUs      int
	// Timeout bounds the whole boot (default 5 minutes).
	Timeout time.Duration
	// Console, when set, receives the console output as it arrives.
	Console io.Writer
	// KernelArgs are appended to the kernel command line.
	KernelArgs string
}

// Result is what a finished guest reported.
type Result struct {
	Console string // the serial console (kernel messages and script output), \r removed
	// Output is the script's output alone: Console without the kernel's
	// lines. The kernel writes a message to the serial port whole, but in
	// the middle of a line of the script's ("writer stopped b[ 8.81]
	// Buffer I/O error ...\ny an error"), so markers are looked for here.
	Output   string
	ExitCode int           // the guest script's exit status
	Duration time.Duration // qemu start to power-off
}

// ErrTimeout is wrapped by Run when the guest did not finish in time.
var ErrTimeout = errors.New("vmtest: guest timed out")

var exitRe = regexp.MustCompile(`<<<vmtest-exit:(\d+)>>>`)

// kernelLineRe matches one kernel console message: a "[  seconds.micro] "
// stamp up to the end of its line.
var kernelLineRe = regexp.MustCompile(`\[ *\d+\.\d{6}\] [^\n]*\n?`)

// ScriptOutput removes the kernel's messages from a console transcript,
// including those printed into the middle of a line of the script's.
func ScriptOutput(console string) string { return kernelLineRe.ReplaceAllString(console, "") }

// Run boots a guest and waits for its script. An error means the harness or
// the guest failed (qemu missing, kernel panic, timeout); a script failure is
// a non-zero Result.ExitCode with a nil error.
func Run(ctx context.Context, g Guest) (Result, error) {
	if g.Timeout == 0 {
		g.Timeout = 5 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, g.Timeout)
	defer cancel()
	img, err := Prepare(ctx)
	if err != nil {
		return Result{}, err
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return Result{}, fmt.Errorf("vmtest: qemu-system-x86_64 not found (install qemu-system-x86): %w", err)
	}
	tmp, err := os.MkdirTemp("", "vmtest-")
	if err != nil {
		return Result{}, fmt.Errorf("vmtest: %w", err)
	}
	defer os.RemoveAll(tmp)
	initrd := filepath.Join(tmp, "initrd.cpio")
	if err := writeInitrd(ctx, initrd, img, g); err != nil {
		return Result{}, err
	}
	mem, cpus := g.MemoryMiB, g.CPUs
	if mem == 0 {
		mem = 1024
	}
	if cpus == 0 {
		cpus = 2
	}
	args := []string{
		"-accel", "tcg", "-cpu", "max", "-smp", strconv.Itoa(cpus), "-m", strconv.Itoa(mem),
		"-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
		"-kernel", img.Kernel, "-initrd", initrd,
		"-append", strings.TrimSpace("console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off tsc=reliable " + g.KernelArgs),
	}
	// Under TCG the emulated kernel now and then dies before init runs
	// (seen: "IO-APIC + timer doesn't work" panics on a loaded host). A
	// boot that never reached init says nothing about the code under test,
	// so it is retried; anything after "guest ready" is not.
	var res Result
	var runErr error
	for attempt := 1; ; attempt++ {
		cmd := exec.CommandContext(ctx, qemu, args...)
		cmd.WaitDelay = 5 * time.Second
		var buf syncBuffer
		var w io.Writer = &buf
		if g.Console != nil {
			w = io.MultiWriter(&buf, g.Console)
		}
		if os.Getenv("BLOCKD_VMTEST_CONSOLE") != "" {
			w = io.MultiWriter(w, os.Stderr)
		}
		cmd.Stdout = w
		cmd.Stderr = w
		start := time.Now()
		runErr = cmd.Run()
		res = Result{Console: strings.ReplaceAll(buf.String(), "\r", ""), Duration: time.Since(start)}
		res.Output = ScriptOutput(res.Console)
		emu := emulatorFault(res.Console)
		if m := exitRe.FindAllStringSubmatch(res.Output, -1); len(m) > 0 {
			res.ExitCode, _ = strconv.Atoi(m[len(m)-1][1])
			if res.ExitCode == 0 || emu == "" || attempt >= 3 || ctx.Err() != nil {
				return res, nil
			}
		}
		if ctx.Err() != nil || attempt >= 3 || (strings.Contains(res.Console, "vmtest: guest ready") && emu == "") {
			break
		}
		if emu != "" {
			fmt.Fprintf(os.Stderr, "vmtest: attempt %d hit a fault of the emulation (%q), retrying; console tail:\n%s\n",
				attempt, emu, lastLines(res.Console, 20))
			continue
		}
		fmt.Fprintf(os.Stderr, "vmtest: boot attempt %d died before init (retrying); console tail:\n%s\n",
			attempt, lastLines(res.Console, 5))
	}
	if ctx.Err() != nil {
		return res, fmt.Errorf("%w after %v (qemu: %v); console tail:\n%s", ErrTimeout, g.Timeout, runErr, lastLines(res.Console, 40))
	}
	return res, fmt.Errorf("vmtest: guest stopped without an exit status (qemu: %v); console tail:\n%s", runErr, lastLines(res.Console, 40))
}

// emulatorFault names a kernel fault that comes from QEMU's TCG, not from
// the guest: "Oops: int3" is the guest executing a breakpoint its kernel
// had already patched away (live text patching of static keys, which
// TCG's translated code on another vCPU can miss), seen in __alloc_skb at
// boot. A run that failed with one is retried like a boot that died
// before init.
func emulatorFault(console string) string {
	for _, f := range []string{"Oops: int3"} {
		if strings.Contains(console, f) {
			return f
		}
	}
	return ""
}

// writeInitrd writes the base layer followed by the per-run layer.
func writeInitrd(ctx context.Context, dst string, img *Image, g Guest) error {
	f, err := os.Create(dst)
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	defer f.Close()
	base, err := os.Open(img.BaseInitrd)
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	_, err = io.Copy(f, base)
	base.Close()
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	c := newCPIO(f)
	mods := g.Modules
	if mods == nil {
		mods = DefaultModules
	}
	var ml strings.Builder
	seen := map[string]bool{}
	for _, m := range mods {
		lines, ok := img.modules[m]
		if !ok {
			return fmt.Errorf("vmtest: module %q is not in AvailableModules %v", m, AvailableModules)
		}
		for _, l := range lines {
			if !seen[l] {
				seen[l] = true
				ml.WriteString(l + "\n")
			}
		}
	}
	c.file("vmtest/modules", []byte(ml.String()), 0o644)
	var env strings.Builder
	for _, k := range sortedKeys(g.Env) {
		fmt.Fprintf(&env, "export %s=%s\n", k, shellQuote(g.Env[k]))
	}
	c.file("vmtest/env", []byte(env.String()), 0o644)
	c.file("vmtest/script", []byte(g.Script), 0o755)
	if len(g.Tools) > 0 {
		files, err := toolFiles(ctx, g.Tools)
		if err != nil {
			return err
		}
		for _, gp := range sortedKeys(files) {
			c.hostFile(gp, files[gp])
		}
	}
	for _, gp := range sortedKeys(g.Binaries) {
		c.hostFile(gp, g.Binaries[gp])
	}
	for _, gp := range sortedKeys(g.Files) {
		perm := uint32(0o644)
		if strings.Contains(filepath.Dir(gp), "bin") {
			perm = 0o755
		}
		c.file(gp, g.Files[gp], perm)
	}
	if err := c.close(); err != nil {
		return err
	}
	return f.Close()
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Require skips the test (fails it under CI=true) when the host cannot run a
// guest: qemu, busybox-static, the kernel tools. It also skips in -short mode.
func Require(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("vmtest: kernel VM tests are skipped in -short mode")
	}
	for _, tool := range []string{"qemu-system-x86_64", "busybox", "nbd-client", "mke2fs", "e2fsck", "ldd", "xz", "dpkg-deb", "depmod", "modprobe"} {
		testenv.RequireTool(t, tool)
	}
}

// Boot runs the guest for a test: it calls Require, fails the test on a
// harness error, logs the console (shown on failure or with -v) and returns
// the result. The caller checks ExitCode and the console.
func Boot(t testing.TB, g Guest) Result {
	t.Helper()
	Require(t)
	ctx := context.Background()
	if dl, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if d, ok := dl.Deadline(); ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, d.Add(-10*time.Second))
			defer cancel()
		}
	}
	res, err := Run(ctx, g)
	t.Logf("guest console (%v, exit %d):\n%s", res.Duration.Round(time.Millisecond), res.ExitCode, res.Console)
	if err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	return res
}

var (
	buildMu    sync.Mutex
	buildCache = map[string]string{}
)

// GoBuild builds a static (CGO_ENABLED=0) binary of the package pattern pkg
// (relative to the module root, e.g. "./cmd/blockd") once per test process
// and returns its path.
func GoBuild(t testing.TB, pkg string) string {
	t.Helper()
	p, err := goBuild(pkg)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return p
}

// BuildBlockd is GoBuild(t, "./cmd/blockd").
func BuildBlockd(t testing.TB) string {
	t.Helper()
	return GoBuild(t, "./cmd/blockd")
}

func goBuild(pkg string) (string, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := buildCache[pkg]; ok {
		return p, nil
	}
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("vmtest: go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	dir, err := os.MkdirTemp("", "vmtest-bin-")
	if err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("vmtest: go build %s: %w\n%s", pkg, err, b)
	}
	buildCache[pkg] = out
	return out, nil
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
