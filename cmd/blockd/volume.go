package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
)

// `blockd volume ...`: the master's client commands. Their names, flags and
// -o json fields are a contract scripts rely on (README.md): add, never rename.

// Defaults of --timeout and --wait: a master that refuses connections or
// never answers is reported within a few seconds; scripts that wait for a
// master to come up pass --wait.
const (
	defaultAnswerTimeout = 3 * time.Second
	defaultWait          = 2 * time.Second
)

func volClientFlags(extra ...cli.Flag) []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: "master", Value: api.DefaultMaster, EnvVars: []string{"BLOCKD_MASTER"}, Usage: "master API address(es), comma-separated"},
		&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "output format: json (default: text)"},
		&cli.DurationFlag{Name: "timeout", Value: defaultAnswerTimeout, Usage: "how long one master may take to answer before the next is tried"},
		&cli.DurationFlag{Name: "wait", Value: defaultWait, Usage: "keep retrying this long while no master answers or none is leader (a master starting, an election)"},
		tlsFlags()[0], tlsFlags()[1], tlsFlags()[2],
	}, extra...)
}

func volPolicyFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "size", Usage: "volume size in human units (512MiB, 10GiB, 1TB)"},
		&cli.IntFlag{Name: "rf", Usage: "replication factor (copies, primary included); default from the preset"},
		&cli.StringFlag{Name: "durability", Usage: "best_effort | sync_all | sync_quorum; default from the preset"},
		&cli.StringFlag{Name: "preset", Usage: "database | general | throughput"},
		&cli.StringFlag{Name: "wal-size", Usage: "WAL size in human units; default from the preset"},
		&cli.IntFlag{Name: "block-size", Usage: "block size in bytes (default 4096)"},
		&cli.IntFlag{Name: "min-copies", Usage: "durable copies (the primary's included) a flush needs before it is acknowledged; default from the preset (2 for rf >= 3, else 1)"},
	}
}

func init() {
	register(&cli.Command{
		Name:  "volume",
		Usage: "create, inspect, resize, delete and promote volumes (talks to the master)",
		Subcommands: append([]*cli.Command{
			{Name: "create", Usage: "create a volume", ArgsUsage: "NAME --size SIZE [--rf N] [--durability MODE] [--preset NAME] [--wal-size SIZE]",
				Flags: volClientFlags(append(volPolicyFlags(), allowFlag())...), Action: volumeCmd(volCreate)},
			{Name: "list", Usage: "list volumes", Flags: volClientFlags(), Action: volumeCmd(volListCmd)},
			{Name: "info", Usage: "show one volume", ArgsUsage: "NAME [--watch]", Flags: volClientFlags(watchFlags()...), Action: volumeCmd(volInfo)},
			{Name: "delete", Usage: "delete a volume (servers drop its data)", ArgsUsage: "NAME", Flags: volClientFlags(), Action: volumeCmd(volDelete)},
			{Name: "expand", Usage: "grow a volume", ArgsUsage: "NAME --size SIZE",
				Flags: volClientFlags(&cli.StringFlag{Name: "size", Usage: "new size (human units); may only grow"}), Action: volumeCmd(volExpand)},
			{Name: "update", Usage: "change a volume's policy", ArgsUsage: "NAME [--min-copies N] [--allow NAME[:ro]... | --allow-anyone]",
				Flags: volClientFlags(&cli.IntFlag{Name: "min-copies", Usage: "durable copies (the primary's included) a flush needs, 1 to rf"},
					allowFlag(), &cli.BoolFlag{Name: "allow-anyone", Usage: "lift the allow list: any certificate of the cluster CA may attach"}), Action: volumeCmd(volUpdate)},
			{Name: "plan", Usage: "dry run of create: resolved policy and placement", ArgsUsage: "[NAME] --size SIZE [...]",
				Flags: volClientFlags(volPolicyFlags()...), Action: volumeCmd(volPlan)},
			{Name: "resolve", Usage: "dry run of preset resolution", ArgsUsage: "[NAME] --size SIZE [...]",
				Flags: volClientFlags(volPolicyFlags()...), Action: volumeCmd(volResolve)},
			{Name: "preflight", Usage: "read-only: which replica could be promoted, and why not", ArgsUsage: "NAME",
				Flags: volClientFlags(), Action: volumeCmd(volPreflight)},
			{Name: "promote", Usage: "make a replica the primary (epoch+1)", ArgsUsage: "NAME [--target ID] [--force]",
				Flags: volClientFlags(
					&cli.StringFlag{Name: "target", Usage: "server ID to promote (default: the best candidate)"},
					&cli.BoolFlag{Name: "force", Usage: "bypass soft gates (lag, not in sync, lower LSN, live primary); hard gates still hold"},
				), Action: volumeCmd(volPromote)},
		}, imageCommands()...),
	})
}

// volCtx is one invocation of a volume subcommand.
type volCtx struct {
	c    *cli.Context
	args []string
	cl   *api.Client
	ctx  context.Context
	json bool
	out  io.Writer
}

func volumeCmd(fn func(*volCtx) error) cli.ActionFunc {
	return clientCmd("volume ", fn)
}

// clientCmd is the setup every master client command shares (output
// format, timeouts, the client); errors are prefixed with prefix and the
// command's name.
func clientCmd(prefix string, fn func(*volCtx) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		name := commandPath(c)
		if prefix == "" { // a top-level command (status)
			name = c.Command.Name
		}
		args := c.Args().Slice()
		switch o := c.String("o"); o {
		case "", "text", "json":
		default:
			return fmt.Errorf("%s: -o %s: unknown output format (json, or text by default)", name, api.QuoteName(o))
		}
		if c.Duration("timeout") <= 0 {
			return fmt.Errorf("%s: --timeout %v: must be more than 0", name, c.Duration("timeout"))
		}
		if c.Duration("wait") < 0 {
			return fmt.Errorf("%s: --wait %v: cannot be negative", name, c.Duration("wait"))
		}
		addrs, err := masterAddrs(c.String("master"))
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		cl, err := apiClient(c, addrs)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		cl.AnswerTimeout = c.Duration("timeout")
		cl.RetryFor = c.Duration("wait")
		v := &volCtx{c: c, args: args, cl: cl, ctx: c.Context, json: c.String("o") == "json", out: c.App.Writer}
		if err := fn(v); err != nil {
			var ue *api.UnreachableError
			if errors.As(err, &ue) && !ue.MaybeApplied {
				return fmt.Errorf("%s: %w (--wait DURATION keeps trying longer)", name, volOneLine(err))
			}
			return fmt.Errorf("%s: %w", name, volOneLine(err))
		}
		return nil
	}
}

func volOneLine(err error) error {
	var ae *api.Error
	if errors.As(err, &ae) {
		return errors.New(strings.ReplaceAll(ae.Error(), "\n", " "))
	}
	return errors.New(strings.ReplaceAll(err.Error(), "\n", " "))
}

func (v *volCtx) name(optional bool) (string, error) {
	switch {
	case len(v.args) == 1:
		return v.args[0], checkVolumeName(v.args[0])
	case len(v.args) == 0 && optional:
		return "", nil
	case len(v.args) == 0:
		return "", errors.New("a volume NAME is needed")
	default:
		return "", fmt.Errorf("one volume NAME expected, got %d arguments", len(v.args))
	}
}

// volParseSize reads a size flag (empty: unset, 0); align rounds it up to a
// multiple of align.
func volParseSize(flagName, s string, align int64) (int64, error) {
	if s == "" {
		return 0, nil
	}
	sz, err := parseSize("--"+flagName, s)
	if err != nil {
		return 0, err
	}
	if align > 0 && sz%align != 0 {
		r := (sz/align + 1) * align
		fmt.Fprintf(os.Stderr, "note: --%s %s rounded up to %d bytes (a multiple of the %d-byte block size)\n", flagName, s, r, align)
		sz = r
	}
	return sz, nil
}

func (v *volCtx) policy(name string) (api.CreateVolumeRequest, error) {
	c := v.c
	if err := positiveIntFlag(c, "rf", "the replication factor counts copies, the primary's included"); err != nil {
		return api.CreateVolumeRequest{}, err
	}
	if err := positiveIntFlag(c, "block-size", "a block size is a number of bytes (512 to 65536, a power of 2)"); err != nil {
		return api.CreateVolumeRequest{}, err
	}
	if err := positiveIntFlag(c, "min-copies", "a flush needs at least one durable copy, the primary's"); err != nil {
		return api.CreateVolumeRequest{}, err
	}
	bs := int64(c.Int("block-size"))
	if bs <= 0 {
		bs = 4096
	}
	req := api.CreateVolumeRequest{Name: name, RF: c.Int("rf"), Durability: c.String("durability"), Preset: c.String("preset"), BlockSize: c.Int("block-size"), MinCopies: c.Int("min-copies")}
	var err error
	if req.SizeBytes, err = volParseSize("size", c.String("size"), bs); err != nil {
		return req, err
	}
	if req.WALSizeBytes, err = volParseSize("wal-size", c.String("wal-size"), bs); err != nil {
		return req, err
	}
	return req, nil
}

func (v *volCtx) emitJSON(x any) error {
	enc := json.NewEncoder(v.out)
	enc.SetIndent("", "  ")
	return enc.Encode(x)
}

func volHumanSize(n int64) string {
	if n < 0 {
		return fmt.Sprint(n)
	}
	return humanize.IBytes(uint64(n))
}

func (v *volCtx) printInfo(i *api.VolumeInfo) error {
	if v.json {
		return v.emitJSON(i)
	}
	w := tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "name:\t%s\n", i.Name)
	fmt.Fprintf(w, "size:\t%s (%d bytes)\n", volHumanSize(i.SizeBytes), i.SizeBytes)
	fmt.Fprintf(w, "block size:\t%d\n", i.BlockSize)
	fmt.Fprintf(w, "status:\t%s\n", i.Status)
	fmt.Fprintf(w, "epoch:\t%d\n", i.Epoch)
	fmt.Fprintf(w, "durability:\t%s\n", i.Durability)
	fmt.Fprintf(w, "rf:\t%d\n", i.RF)
	if i.Preset != "" {
		fmt.Fprintf(w, "preset:\t%s\n", i.Preset)
	}
	fmt.Fprintf(w, "wal size:\t%s\n", volHumanSize(i.WALSizeBytes))
	fmt.Fprintf(w, "min copies:\t%d\n", i.MinCopies)
	fmt.Fprintf(w, "allow:\t%s\n", api.FormatAllow(i.Allow))
	fmt.Fprintf(w, "primary:\t%s nbd=%s addr=%s head_lsn=%d\n", i.Primary.ServerID, i.Primary.NBDAddr, i.Primary.Addr, i.HeadLSN)
	for _, r := range i.Replicas {
		member := ""
		switch {
		case r.Stale:
			member = " (stale)"
		case r.InActingSet:
			member = " (in acting set)"
		}
		fmt.Fprintf(w, "replica:\t%s %s flushed_lsn=%d addr=%s%s\n", r.ServerID, r.State, r.FlushedLSN, r.Addr, member)
		if p := r.Progress; p != nil {
			fmt.Fprintf(w, "\t  %s %s (--watch follows it)\n", p.Kind, progressSummary(p))
		}
	}
	fmt.Fprintf(w, "acting set:\t%s\n", volList(i.ActingSet))
	fmt.Fprintf(w, "stale:\t%s\n", volList(i.Stale))
	if i.FlushesOK {
		fmt.Fprintf(w, "flushes:\tok\n")
	} else {
		blocker := i.FlushBlocker
		if blocker == "" {
			blocker = "no reason given"
		}
		fmt.Fprintf(w, "flushes:\tblocked: %s\n", blocker)
	}
	if i.Status == api.StatusFailed || i.Failure != "" {
		fmt.Fprintf(w, "failure:\t%s\n", i.Failure)
	}
	return w.Flush()
}

// volList prints IDs comma-separated, "(none)" for none.
func volList(ids []string) string {
	if len(ids) == 0 {
		return "(none)"
	}
	return strings.Join(ids, ",")
}

func volCreate(v *volCtx) error {
	name, err := v.name(false)
	if err != nil {
		return err
	}
	if v.c.String("size") == "" {
		return errors.New("--size is required")
	}
	req, err := v.policy(name)
	if err != nil {
		return err
	}
	if req.Allow, err = api.ParseAllow(splitList(v.c.StringSlice("allow"))); err != nil {
		return err
	}
	info, err := v.cl.CreateVolume(v.ctx, req)
	if err != nil {
		var ae *api.Error
		if v.json && errors.As(err, &ae) && len(ae.Placement) > 0 {
			// The refusal with every server's reason, for scripts; the
			// one-line reason still goes to stderr.
			_ = v.emitJSON(struct {
				Error *api.Error `json:"error"`
			}{ae})
		}
		return err
	}
	return v.printInfo(info)
}

func volUpdate(v *volCtx) error {
	name, err := v.name(false)
	if err != nil {
		return err
	}
	var req api.UpdateVolumeRequest
	if v.c.IsSet("min-copies") {
		n := v.c.Int("min-copies")
		if n < 1 {
			return fmt.Errorf("--min-copies %d: a flush needs at least one durable copy, the primary's; use 1 to the volume's rf", n)
		}
		req.MinCopies = &n
	}
	switch {
	case v.c.IsSet("allow") && v.c.Bool("allow-anyone"):
		return errors.New("--allow and --allow-anyone: give one of them")
	case v.c.IsSet("allow"):
		list, err := api.ParseAllow(splitList(v.c.StringSlice("allow")))
		if err != nil {
			return err
		}
		req.Allow = &list
	case v.c.Bool("allow-anyone"):
		req.Allow = &[]api.AllowEntry{}
	}
	if req.MinCopies == nil && req.Allow == nil {
		return errors.New("nothing to update: give --min-copies N, --allow NAME[:ro] or --allow-anyone")
	}
	info, err := v.cl.UpdateVolume(v.ctx, name, req)
	if err != nil {
		return err
	}
	return v.printInfo(info)
}

func volListCmd(v *volCtx) error {
	if len(v.args) != 0 {
		return fmt.Errorf("unexpected arguments %s", api.QuoteName(strings.Join(v.args, " ")))
	}
	vols, err := v.cl.ListVolumes(v.ctx)
	if err != nil {
		return err
	}
	if v.json {
		return v.emitJSON(vols)
	}
	w := tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSIZE\tRF\tDURABILITY\tEPOCH\tSTATUS\tPRIMARY\tREPLICAS")
	for _, i := range vols {
		var reps []string
		for _, r := range i.Replicas {
			reps = append(reps, r.ServerID+":"+r.State)
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%d\t%s\t%s\t%s\n", i.Name, volHumanSize(i.SizeBytes), i.RF, i.Durability, i.Epoch, i.Status, i.Primary.ServerID, strings.Join(reps, ","))
	}
	return w.Flush()
}

func volInfo(v *volCtx) error {
	name, err := v.name(false)
	if err != nil {
		return err
	}
	if v.c.Bool("watch") {
		if v.json {
			return errors.New("--watch draws for people; use -o json without --watch (once per call) for scripts")
		}
		return volWatch(v, name)
	}
	info, err := v.cl.VolumeInfo(v.ctx, name)
	if err != nil {
		return err
	}
	return v.printInfo(info)
}

func volDelete(v *volCtx) error {
	name, err := v.name(false)
	if err != nil {
		return err
	}
	if err := v.cl.DeleteVolume(v.ctx, name); err != nil {
		return err
	}
	if v.json {
		return v.emitJSON(map[string]string{"deleted": name})
	}
	fmt.Fprintf(v.out, "deleted %s\n", name)
	return nil
}

func volPrintWarnings(w io.Writer, ws []api.Warning, es []api.Error) {
	for _, x := range ws {
		fmt.Fprintf(w, "warning:\t%s: %s\n", x.Code, x.Message)
	}
	for _, x := range es {
		fmt.Fprintf(w, "error:\t%s: %s\n", x.Code, x.Message)
	}
}

func volPrintPolicy(w io.Writer, p api.ResolvedPolicy) {
	if p.Preset != "" {
		fmt.Fprintf(w, "preset:\t%s\n", p.Preset)
	}
	fmt.Fprintf(w, "size:\t%s (%d bytes)\n", volHumanSize(p.SizeBytes), p.SizeBytes)
	fmt.Fprintf(w, "block size:\t%d\n", p.BlockSize)
	fmt.Fprintf(w, "rf:\t%d\n", p.RF)
	fmt.Fprintf(w, "durability:\t%s\n", p.Durability)
	fmt.Fprintf(w, "wal size:\t%s\n", volHumanSize(p.WALSizeBytes))
}

// dryRunErr makes a dry run that found errors exit non-zero (after printing).
func volDryRunErr(es []api.Error) error {
	if len(es) == 0 {
		return nil
	}
	return errors.New(es[0].Error())
}

func volPlan(v *volCtx) error {
	name, err := v.name(true)
	if err != nil {
		return err
	}
	req, err := v.policy(name)
	if err != nil {
		return err
	}
	p, err := v.cl.PlanVolume(v.ctx, req)
	if err != nil {
		return err
	}
	if v.json {
		if err := v.emitJSON(p); err != nil {
			return err
		}
		return volDryRunErr(p.Errors)
	}
	w := tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	volPrintPolicy(w, p.Policy)
	if p.Primary != "" {
		fmt.Fprintf(w, "primary:\t%s\n", p.Primary)
		fmt.Fprintf(w, "replicas:\t%s\n", strings.Join(p.Replicas, ","))
	}
	volPrintWarnings(w, p.Warnings, p.Errors)
	fmt.Fprintln(w, "\nSERVER\tVOLUMES\tFREE\tSELECTED\tREJECTION")
	for _, c := range p.Candidates {
		fmt.Fprintf(w, "%s\t%d\t%s\t%v\t%s\n", c.ServerID, c.VolumeCount, volHumanSize(c.FreeBytes), c.Selected, c.Rejection)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	return volDryRunErr(p.Errors)
}

func volResolve(v *volCtx) error {
	name, err := v.name(true)
	if err != nil {
		return err
	}
	req, err := v.policy(name)
	if err != nil {
		return err
	}
	r, err := v.cl.ResolveVolume(v.ctx, req)
	if err != nil {
		return err
	}
	if v.json {
		if err := v.emitJSON(r); err != nil {
			return err
		}
		return volDryRunErr(r.Errors)
	}
	w := tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	volPrintPolicy(w, r.Policy)
	volPrintWarnings(w, r.Warnings, r.Errors)
	if err := w.Flush(); err != nil {
		return err
	}
	return volDryRunErr(r.Errors)
}

func volPrintCandidates(w io.Writer, cs []api.Candidate) {
	fmt.Fprintln(w, "SERVER\tELIGIBLE\tFORCEABLE\tROLE\tEPOCH\tSTATE\tFLUSHED_LSN\tREASONS")
	for _, c := range cs {
		fmt.Fprintf(w, "%s\t%v\t%v\t%s\t%d\t%s\t%d\t%s\n", c.ServerID, c.Eligible, c.Forceable, c.Role, c.Epoch, c.State, c.FlushedLSN, strings.Join(c.Reasons, ","))
	}
}

func volPreflight(v *volCtx) error {
	name, err := v.name(false)
	if err != nil {
		return err
	}
	p, err := v.cl.Preflight(v.ctx, name)
	if err != nil {
		return err
	}
	if v.json {
		return v.emitJSON(p)
	}
	w := tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "volume:\t%s\n", p.Volume)
	fmt.Fprintf(w, "epoch:\t%d\n", p.Epoch)
	fmt.Fprintf(w, "primary:\t%s (lease may be live: %v, %dms left)\n", p.Primary, p.PrimaryAlive, p.LeaseExpiresMS)
	best := p.Best
	if best == "" {
		best = "(none)"
	}
	fmt.Fprintf(w, "best candidate:\t%s\n", best)
	if len(p.Blockers) > 0 {
		fmt.Fprintf(w, "blockers:\t%s\n", strings.Join(p.Blockers, ","))
	}
	fmt.Fprintln(w)
	volPrintCandidates(w, p.Candidates)
	return w.Flush()
}

func volPromote(v *volCtx) error {
	name, err := v.name(false)
	if err != nil {
		return err
	}
	// Pin the epoch we decided on, so a retry can never promote twice.
	info, err := v.cl.VolumeInfo(v.ctx, name)
	if err != nil {
		return err
	}
	r, err := v.cl.Promote(v.ctx, name, api.PromoteRequest{Target: v.c.String("target"), Force: v.c.Bool("force"), Epoch: info.Epoch})
	if err != nil {
		return err // one line; `volume preflight NAME` shows every candidate
	}
	if v.json {
		return v.emitJSON(r)
	}
	fmt.Fprintf(v.out, "promoted %s: %s -> %s at epoch %d", r.Volume, r.OldPrimary, r.NewPrimary, r.Epoch)
	if len(r.Bypassed) > 0 {
		fmt.Fprintf(v.out, " (forced past: %s)", strings.Join(r.Bypassed, ","))
	}
	if r.LeaseWaitMS > 0 {
		fmt.Fprintf(v.out, "; it accepts writes after the old lease expires (%dms)", r.LeaseWaitMS)
	}
	fmt.Fprintln(v.out)
	return nil
}
