package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/schollz/progressbar/v3"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/image"
	"github.com/blockd/blockd/tlsauth"
)

// `blockd volume export | import | clone`: image streams between the
// volume's primary and this client (docs/IMAGE-FORMAT.md). The master only
// says where the primary is; the bytes never pass through it.

// imageCommands are the subcommands volume.go registers.
func imageCommands() []*cli.Command {
	return []*cli.Command{
		{Name: "export", Usage: "stream a volume or a snapshot as a sparse, checksummed image", ArgsUsage: "VOLUME[@SNAP] --output FILE|- [--since SNAP0]",
			Description: "Without @SNAP the live volume is exported through a temporary snapshot (consistent).\n" +
				"--since SNAP0 streams only what changed between SNAP0 and SNAP (a diff image).\n" +
				"The stream is verified as it arrives; a partial FILE is removed on failure.\n" +
				"Examples:\n   blockd volume export vol0@s1 --output vol0-s1.img\n" +
				"   blockd volume export vol0@s2 --since s1 --output - | ssh backup 'cat > vol0-s1-s2.img'",
			Flags: exportFlags(), Action: volumeCmd(volExport)},
		{Name: "import", Usage: "apply an image to a volume (verified whole before the volume changes)", ArgsUsage: "VOLUME --input FILE|- [--force]",
			Description: "A full image goes into an empty volume (no data, no snapshots); a diff onto the volume\n" +
				"whose data is still the diff's base snapshot. --force overwrites anyway.\n" +
				"Examples:\n   blockd volume import vol1 --input vol0-s1.img\n   blockd volume import vol1 --input vol0-s1-s2.img\n" +
				"   cat vol0-s1.img | blockd volume import vol2 --input - --force",
			Flags: volClientFlags(
				&cli.StringFlag{Name: "input", Aliases: []string{"i"}, Usage: "image file to read, - for stdin (required)"},
				&cli.BoolFlag{Name: "force", Usage: "import into a volume that holds data or snapshots, or a diff onto a changed volume"},
			), Action: volumeCmd(volImport)},
		{Name: "clone", Usage: "make a new, independent volume from a snapshot (a full copy)", ArgsUsage: "VOLUME@SNAP NEWVOLUME",
			Description: "The master places NEWVOLUME like any new volume, with the source's size, rf and durability;\n" +
				"the data then streams source primary -> this client -> new primary. NEWVOLUME holds SNAP too.\n" +
				"Example:\n   blockd volume clone vol0@s1 vol0-copy",
			Flags: volClientFlags(), Action: volumeCmd(volClone)},
	}
}

// exportFlags are the client flags with -o (the output format, json) and
// --output (the image file) as two flags: everywhere else they are one.
func exportFlags() []cli.Flag {
	var fl []cli.Flag
	for _, f := range volClientFlags() {
		if f.Names()[0] == "output" {
			f = &cli.StringFlag{Name: "o", Usage: "output format: json (default: text)"}
		}
		fl = append(fl, f)
	}
	return append(fl,
		&cli.StringFlag{Name: "output", Usage: "image file to write, - for stdout (required)"},
		&cli.StringFlag{Name: "since", Usage: "older snapshot: export only the blocks changed since it"})
}

// splitVolSnap splits VOLUME[@SNAP].
func splitVolSnap(arg string, needSnap bool) (vol, snap string, err error) {
	vol, snap, at := strings.Cut(arg, "@")
	if err := checkVolumeName(vol); err != nil {
		return "", "", err
	}
	if at || needSnap {
		if err := blockvol.CheckSnapshotName(snap); err != nil {
			return "", "", fmt.Errorf("%s: %w", api.QuoteName(arg), err)
		}
	}
	return vol, snap, nil
}

// serverClient asks the master for the volume's primary and returns a
// client of its admin API (TLS: it must present the named server's
// certificate).
func (v *volCtx) serverClient(volume string) (*api.Client, *api.PrimaryInfo, error) {
	deadline := time.Now().Add(v.c.Duration("wait"))
	for {
		p, err := v.cl.PrimaryOf(v.ctx, volume)
		if err == nil && p.HTTPAddr != "" {
			creds, err := loadTLS(v.c)
			if err != nil {
				return nil, nil, err
			}
			if creds == nil {
				return api.NewClient([]string{p.HTTPAddr}), p, nil
			}
			return api.NewClientTLS([]string{p.HTTPAddr}, creds.ClientConfig(tlsauth.Expect(tlsauth.KindServer, p.ServerID))), p, nil
		}
		if err == nil {
			err = fmt.Errorf("volume %s: its primary, server %s, has no admin API address (start it with blockd server --http ADDR)", volume, p.ServerID)
		} else if api.IsCode(err, api.CodeNotFound) {
			return nil, nil, fmt.Errorf("unknown volume %s: %w", api.QuoteName(volume), err)
		}
		if time.Now().After(deadline) {
			return nil, nil, err
		}
		select {
		case <-v.ctx.Done():
			return nil, nil, err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// progress wraps r with a progress bar on stderr when stderr is a
// terminal (total <= 0: unknown, a spinner with bytes and rate).
func progress(r io.Reader, total int64, what string) (io.Reader, func()) {
	if !isatty.IsTerminal(os.Stderr.Fd()) && !isatty.IsCygwinTerminal(os.Stderr.Fd()) {
		return r, func() {}
	}
	if total <= 0 {
		total = -1
	}
	bar := progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetDescription(what),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowCount(),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish(),
	)
	pr := progressbar.NewReader(r, bar)
	return &pr, func() { _ = bar.Finish() }
}

func volExport(v *volCtx) error {
	if len(v.args) != 1 {
		return fmt.Errorf("want VOLUME[@SNAP], got %d argument(s)", len(v.args))
	}
	vol, snap, err := splitVolSnap(v.args[0], false)
	if err != nil {
		return err
	}
	since := v.c.String("since")
	if since != "" {
		if err := blockvol.CheckSnapshotName(since); err != nil {
			return fmt.Errorf("--since: %w", err)
		}
	}
	// Here -o is only the output format and --output the image file
	// (exportFlags).
	out := v.c.String("output")
	if out == "" {
		return errors.New("--output FILE|- is required (the image goes there; - for stdout)")
	}
	sc, _, err := v.serverClient(vol)
	if err != nil {
		return err
	}
	stream, est, err := sc.ExportImage(v.ctx, vol, snap, since)
	if err != nil {
		return err
	}
	defer stream.Close()
	var w io.Writer
	var f *os.File
	if out == "-" {
		w = os.Stdout
	} else {
		f, err = os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return fmt.Errorf("output: %w", err)
		}
		w = &writeBehind{f: f}
	}
	fail := func(err error) error {
		if f != nil {
			f.Close()
			os.Remove(out)
			return fmt.Errorf("%w (partial %s removed)", err, out)
		}
		return err
	}
	src, done := progress(stream, est, "export "+v.args[0])
	// Verify what is written as it passes: a cut stream (the server
	// failed mid-way) is reported, not left looking like an image.
	var n countWriter
	tee := io.TeeReader(src, io.MultiWriter(w, &n))
	hdr, sum, err := image.Verify(tee)
	done()
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			return fail(fmt.Errorf("write %s: %w", out, err))
		}
		return fail(fmt.Errorf("export of %s ended badly after %d bytes: %w", v.args[0], n, err))
	}
	if f != nil {
		if err := f.Sync(); err != nil {
			return fail(fmt.Errorf("sync %s: %w", out, err))
		}
		if err := f.Close(); err != nil {
			f = nil
			os.Remove(out)
			return fmt.Errorf("close %s: %w", out, err)
		}
	}
	res := map[string]any{"volume": vol, "snapshot": snap, "since": since, "kind": hdr.Kind.String(),
		"image_bytes": int64(n), "data_bytes": sum.DataBytes, "zero_bytes": sum.ZeroBytes,
		"size_bytes": hdr.Size, "source_uuid": hdr.SourceUUID, "digest": fmt.Sprintf("%x", sum.Digest), "output": out}
	if v.json {
		if out == "-" {
			return nil // stdout carries the image
		}
		return v.emitJSON(res)
	}
	msg := fmt.Sprintf("exported %s (%s image, %s of data in %s) to %s\n", v.args[0], hdr.Kind, volHumanSize(int64(sum.DataBytes)), volHumanSize(int64(n)), out)
	if out == "-" {
		fmt.Fprint(os.Stderr, msg)
	} else {
		fmt.Fprint(v.out, msg)
	}
	return nil
}

// writeBehind starts the kernel's writeback of the output every
// writeBehindStep bytes (sync_file_range, no waiting), so the final fsync
// finds little left to write instead of the whole image.
type writeBehind struct {
	f         *os.File
	off, mark int64
}

const writeBehindStep = 8 << 20

func (w *writeBehind) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.off += int64(n)
	if w.off-w.mark >= writeBehindStep {
		_ = unix.SyncFileRange(int(w.f.Fd()), w.mark, w.off-w.mark, unix.SYNC_FILE_RANGE_WRITE)
		w.mark = w.off
	}
	return n, err
}

type countWriter int64

func (c *countWriter) Write(p []byte) (int, error) { *c += countWriter(len(p)); return len(p), nil }

func volImport(v *volCtx) error {
	if len(v.args) != 1 {
		return fmt.Errorf("want VOLUME, got %d argument(s)", len(v.args))
	}
	vol := v.args[0]
	if err := checkVolumeName(vol); err != nil {
		return err
	}
	in := v.c.String("input")
	if in == "" {
		return errors.New("--input FILE|- is required (the image to import; - for stdin)")
	}
	var r io.Reader
	var total int64
	if in == "-" {
		r = os.Stdin
	} else {
		f, err := os.Open(in)
		if err != nil {
			return fmt.Errorf("input: %w", err)
		}
		defer f.Close()
		if st, err := f.Stat(); err == nil {
			total = st.Size()
		}
		r = f
	}
	sc, _, err := v.serverClient(vol)
	if err != nil {
		return err
	}
	src, done := progress(r, total, "import "+filepath.Base(in))
	res, err := sc.ImportImage(v.ctx, vol, src, v.c.Bool("force"))
	done()
	if err != nil {
		return err
	}
	if v.json {
		return v.emitJSON(res)
	}
	from := in
	if in == "-" {
		from = "stdin"
	}
	fmt.Fprintf(v.out, "imported %s into %s (%s image, %s of data)", from, vol, res.Kind, volHumanSize(res.DataBytes))
	if res.Snapshot != "" {
		fmt.Fprintf(v.out, "; snapshot %s@%s created", vol, res.Snapshot)
	}
	fmt.Fprintln(v.out)
	return nil
}

func volClone(v *volCtx) error {
	if len(v.args) != 2 {
		return fmt.Errorf("want VOLUME@SNAP NEWVOLUME, got %d argument(s)", len(v.args))
	}
	vol, snap, err := splitVolSnap(v.args[0], true)
	if err != nil {
		return err
	}
	dst := v.args[1]
	if err := checkVolumeName(dst); err != nil {
		return err
	}
	info, err := v.cl.VolumeInfo(v.ctx, vol)
	if err != nil {
		if api.IsCode(err, api.CodeNotFound) {
			return fmt.Errorf("unknown volume %s: %w", api.QuoteName(vol), err)
		}
		return err
	}
	src, _, err := v.serverClient(vol)
	if err != nil {
		return err
	}
	// Open the export first: an unknown snapshot is refused before the
	// new volume exists.
	stream, est, err := src.ExportImage(v.ctx, vol, snap, "")
	if err != nil {
		return err
	}
	defer stream.Close()
	created, err := v.cl.CreateVolume(v.ctx, api.CreateVolumeRequest{Name: dst, SizeBytes: info.SizeBytes, BlockSize: info.BlockSize,
		RF: info.RF, Durability: info.Durability, WALSizeBytes: info.WALSizeBytes, MinCopies: info.MinCopies, Allow: info.Allow})
	if err != nil {
		return fmt.Errorf("create %s: %w", dst, err)
	}
	// The reason is flattened to text: the CLI prints an *api.Error alone,
	// and what happened to the new volume must be in the line too.
	undo := func(err error) error {
		if derr := v.cl.DeleteVolume(v.ctx, dst); derr != nil {
			return fmt.Errorf("%v (and deleting the new volume %s failed: %v)", volOneLine(err), dst, derr)
		}
		return fmt.Errorf("%v (the new volume %s was deleted)", volOneLine(err), dst)
	}
	// The new volume's primary needs a moment to open it and to hold its
	// lease: ask until a cheap call succeeds there, then send the stream
	// once (a stream half sent cannot be offered again).
	wait := max(v.c.Duration("wait"), 30*time.Second)
	deadline := time.Now().Add(wait)
	var dc *api.Client
	for {
		dc, _, err = v.serverClient(dst)
		if err == nil {
			_, err = dc.ListSnapshots(v.ctx, dst)
		}
		if err == nil || time.Now().After(deadline) || v.ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		return undo(fmt.Errorf("the new volume %s did not come up: %w", dst, err))
	}
	body, done := progress(stream, est, "clone "+v.args[0])
	res, err := dc.ImportImage(v.ctx, dst, body, false)
	done()
	if err != nil {
		return undo(err)
	}
	out := map[string]any{"name": dst, "source": vol, "snapshot": snap, "size_bytes": created.SizeBytes, "rf": created.RF,
		"durability": created.Durability, "data_bytes": res.DataBytes, "image_bytes": res.ImageBytes}
	if v.json {
		return v.emitJSON(out)
	}
	fmt.Fprintf(v.out, "cloned %s into %s (%s, %s of data copied); %s@%s exists too\n", v.args[0], dst, volHumanSize(created.SizeBytes), volHumanSize(res.DataBytes), dst, snap)
	return nil
}
