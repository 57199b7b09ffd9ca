package main

// blockd volume info NAME --watch: redraws the volume's replica states
// with a progress bar for each catch-up, resync or rebuild (bytes, rate,
// ETA). On a terminal each frame replaces the last; otherwise frames are
// printed one after another (a log, a capture).

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
)

func watchFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "watch", Aliases: []string{"w"}, Usage: "redraw the replica states and transfer progress until Ctrl-C"},
		&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "with --watch: time between redraws"},
		&cli.IntFlag{Name: "count", Usage: "with --watch: stop after N redraws (0: until Ctrl-C)"},
	}
}

// isTerminal reports whether w is a terminal (then frames redraw in place).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// sample is one replica's progress as last seen, for the rate.
type sample struct {
	at   time.Time
	done int64 // bytes (base transfer) or LSNs (catch-up)
	kind string
}

func volWatch(v *volCtx, name string) error {
	interval := v.c.Duration("interval")
	if interval <= 0 {
		return fmt.Errorf("--interval %v: must be more than 0", interval)
	}
	count := v.c.Int("count")
	if count < 0 {
		return fmt.Errorf("--count %d: cannot be negative", count)
	}
	tty := isTerminal(v.out)
	last := map[string]sample{}
	for n := 0; count == 0 || n < count; n++ {
		if n > 0 {
			select {
			case <-v.ctx.Done():
				return nil
			case <-time.After(interval):
			}
		}
		info, err := v.cl.VolumeInfo(v.ctx, name)
		if err != nil {
			if v.ctx.Err() != nil {
				return nil
			}
			return err
		}
		frame := renderWatch(info, time.Now(), last)
		if tty {
			fmt.Fprint(v.out, "\033[H\033[2J")
		} else if n > 0 {
			fmt.Fprintln(v.out)
		}
		fmt.Fprint(v.out, frame)
	}
	return nil
}

// renderWatch draws one frame; last carries each replica's previous
// sample (updated) for the rate.
func renderWatch(info *api.VolumeInfo, now time.Time, last map[string]sample) string {
	var b strings.Builder
	primary := info.Primary.ServerID
	if primary == "" {
		primary = "-"
	}
	fmt.Fprintf(&b, "volume %s  %s  epoch %d  %s rf %d  primary %s  head_lsn %d  %s\n", info.Name, info.Status, info.Epoch,
		info.Durability, info.RF, primary, info.HeadLSN, now.Format("15:04:05"))
	if !info.FlushesOK && info.FlushBlocker != "" {
		fmt.Fprintf(&b, "  flushes blocked: %s\n", info.FlushBlocker)
	}
	width := 0
	for _, r := range info.Replicas {
		width = max(width, len(r.ServerID))
	}
	for _, r := range info.Replicas {
		member := ""
		if r.Stale {
			member = " (stale)"
		}
		fmt.Fprintf(&b, "  %-*s  %-12s", width, r.ServerID, r.State)
		p := r.Progress
		if p == nil {
			delete(last, r.ServerID)
			fmt.Fprintf(&b, " flushed_lsn %d%s\n", r.FlushedLSN, member)
			continue
		}
		var done, total int64
		unit := "bytes"
		if p.TotalBytes > 0 {
			done, total = p.DoneBytes, p.TotalBytes
		} else {
			unit = "LSNs"
			done, total = int64(p.DoneLSN-min(p.FromLSN, p.DoneLSN)), int64(p.TargetLSN-min(p.FromLSN, p.TargetLSN))
		}
		rate := 0.0
		if prev, ok := last[r.ServerID]; ok && prev.kind == p.Kind && now.After(prev.at) && done >= prev.done {
			rate = float64(done-prev.done) / now.Sub(prev.at).Seconds()
		} else if p.ElapsedMS >= 2000 && p.TotalBytes == 0 {
			// A first look at a catch-up: its mean rate so far. (A base
			// transfer may have resumed with bytes done before it started:
			// no rate until the next frame.)
			rate = float64(done) / (float64(p.ElapsedMS) / 1000)
		}
		last[r.ServerID] = sample{at: now, done: done, kind: p.Kind}
		fmt.Fprintf(&b, " %-8s %s %s%s\n", p.Kind, bar(done, total, 24), progressText(done, total, rate, unit), member)
	}
	return b.String()
}

// bar is [#####.....] at done/total.
func bar(done, total int64, width int) string {
	fill := 0
	if total > 0 {
		fill = int(min(done, total) * int64(width) / total)
	}
	return "[" + strings.Repeat("#", fill) + strings.Repeat(".", width-fill) + "]"
}

func progressText(done, total int64, rate float64, unit string) string {
	pct := 0
	if total > 0 {
		pct = int(min(done, total) * 100 / total)
	}
	var amount, speed string
	if unit == "bytes" {
		amount = fmt.Sprintf("%s / %s", humanize.IBytes(uint64(max(done, 0))), humanize.IBytes(uint64(max(total, 0))))
		speed = humanize.IBytes(uint64(rate)) + "/s"
	} else {
		amount = fmt.Sprintf("%d / %d LSNs", done, total)
		speed = fmt.Sprintf("%.0f LSN/s", rate)
	}
	eta := "ETA -"
	if rate > 0 && total > done {
		eta = "ETA " + (time.Duration(float64(total-done) / rate * float64(time.Second))).Round(time.Second).String()
	} else if total > 0 && done >= total {
		eta = "finishing"
	}
	return fmt.Sprintf("%3d%%  %s  %s  %s", pct, amount, speed, eta)
}

// progressSummary is a transfer's amount done, without a rate.
func progressSummary(p *api.TransferProgress) string {
	if p.TotalBytes > 0 {
		return fmt.Sprintf("%d%% %s / %s", min(p.DoneBytes, p.TotalBytes)*100/p.TotalBytes,
			humanize.IBytes(uint64(max(p.DoneBytes, 0))), humanize.IBytes(uint64(p.TotalBytes)))
	}
	return fmt.Sprintf("LSN %d of %d", p.DoneLSN, p.TargetLSN)
}
