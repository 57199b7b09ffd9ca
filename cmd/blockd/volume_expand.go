package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/blockd/blockd/api"
)

// ublkExpandNote is printed after every committed expand: the kernel's
// ublk driver (Linux 6.12) cannot change a started device's size, while a
// `blockd attach nbd` keeper reconnects and resizes its device itself.
const ublkExpandNote = "note: a /dev/ublkbN attached with `blockd attach ublk` keeps its old size until `blockd detach` and `blockd attach ublk` again (the ublk driver has no size update); /dev/nbdN devices of `blockd attach nbd` grow by themselves"

// expandOutcome is `volume expand -o json`: one line.
type expandOutcome struct {
	Name      string   `json:"name"`
	Outcome   string   `json:"outcome"` // committed | unchanged | cancelled
	FromBytes int64    `json:"from_bytes"`
	SizeBytes int64    `json:"size_bytes"` // the volume's size now
	Target    int64    `json:"target_bytes"`
	ExpandID  uint64   `json:"expand_id,omitempty"`
	Members   []string `json:"members,omitempty"`
	Server    string   `json:"server,omitempty"` // cancelled: the member that caused it
	Reason    string   `json:"reason,omitempty"`
	Note      string   `json:"note,omitempty"`
}

// volExpand grows a volume through the master's two-phase expand and
// prints the outcome in one line: committed on every member, or cancelled
// with the member and the cause (then the exit status is non-zero).
func volExpand(v *volCtx) error {
	name, err := v.name(false)
	if err != nil {
		return err
	}
	if v.c.String("size") == "" {
		return errors.New("--size is required")
	}
	sz, err := volParseSize("size", v.c.String("size"), 0)
	if err != nil {
		return err
	}
	// Read first: a volume already at the size answers with its last
	// expand, which is not this call's outcome.
	before, err := v.cl.VolumeInfo(v.ctx, name)
	if err != nil {
		return err
	}
	noop := before.SizeBytes == sz && (before.Expand == nil || before.Expand.Phase != api.ExpandPreparing)
	info, err := v.cl.ExpandVolume(v.ctx, name, sz)
	if err != nil {
		if api.IsCode(err, api.CodeExpandCancelled) && v.json {
			out := expandOutcome{Name: name, Outcome: api.ExpandCancelled, Target: sz}
			if cur, ierr := v.cl.VolumeInfo(v.ctx, name); ierr == nil {
				out.SizeBytes, out.FromBytes = cur.SizeBytes, cur.SizeBytes
				if e := cur.Expand; e != nil && e.Phase == api.ExpandCancelled {
					out.ExpandID, out.Members, out.Server, out.Reason = e.ID, e.Members, e.Server, e.Reason
				}
			}
			_ = v.emitLine(out)
		}
		return err
	}
	out := expandOutcome{Name: name, Outcome: "unchanged", FromBytes: info.SizeBytes, SizeBytes: info.SizeBytes, Target: sz}
	if e := info.Expand; !noop && e != nil && e.Phase == api.ExpandCommitted && e.SizeBytes == sz && info.SizeBytes == sz && e.FromBytes < sz {
		out.Outcome, out.FromBytes, out.ExpandID, out.Members = api.ExpandCommitted, e.FromBytes, e.ID, e.Members
		out.Note = ublkExpandNote
	}
	if v.json {
		return v.emitLine(out)
	}
	if out.Outcome == "unchanged" {
		fmt.Fprintf(v.out, "%s: already %s (%d bytes), nothing to do\n", name, volHumanSize(out.SizeBytes), out.SizeBytes)
		return nil
	}
	fmt.Fprintf(v.out, "%s: expanded from %s to %s (%d bytes), committed on %s\n", name, volHumanSize(out.FromBytes),
		volHumanSize(out.SizeBytes), out.SizeBytes, strings.Join(out.Members, ", "))
	fmt.Fprintln(os.Stderr, out.Note)
	return nil
}

// emitLine prints x as one line of JSON.
func (v *volCtx) emitLine(x any) error {
	b, err := json.Marshal(x)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(v.out, "%s\n", b)
	return err
}
