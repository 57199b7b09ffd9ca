package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/tlsauth"
)

// `blockd snapshot ...`: asks the master where the volume's primary is
// (its admin API, http_addr) and then talks to that primary directly. The
// names, flags and -o json fields are a contract: add, never rename.

func init() {
	register(&cli.Command{
		Name:  "snapshot",
		Usage: "create, list, delete and restore a volume's snapshots (talks to the volume's primary)",
		Description: "A snapshot holds every write acknowledged before it was taken. Replicas hold the same\n" +
			"snapshots; after a failover the new primary serves them. A snapshot is served read-only\n" +
			"over NBD as the export VOLUME@SNAP. Names: 1-64 of [A-Za-z0-9._-], starting with a letter\n" +
			"or digit (docs/SNAPSHOTS.md).",
		Subcommands: []*cli.Command{
			{Name: "create", Usage: "take a snapshot (returns once it is durable per the volume's durability mode)", ArgsUsage: "VOLUME SNAP",
				Description: "Example:\n   blockd snapshot create vol0 before-upgrade\n   qemu-img compare nbd://127.0.0.1:10809/vol0@before-upgrade backup.img",
				Flags:       volClientFlags(), Action: snapshotCmd(2, snapCreate)},
			{Name: "list", Usage: "list a volume's snapshots, oldest first", ArgsUsage: "VOLUME",
				Description: "Example:\n   blockd snapshot list vol0 -o json   (objects with name, created, lsn, size_bytes, ...)",
				Flags:       volClientFlags(), Action: snapshotCmd(1, snapList)},
			{Name: "delete", Usage: "delete a snapshot and give its space back", ArgsUsage: "VOLUME SNAP",
				Description: "Example:\n   blockd snapshot delete vol0 before-upgrade",
				Flags:       volClientFlags(), Action: snapshotCmd(2, snapDelete)},
			{Name: "restore", Usage: "revert a volume to a snapshot (the snapshot stays); clients must reconnect", ArgsUsage: "VOLUME SNAP",
				Description: "Drains in-flight I/O, rewrites every block changed since the snapshot and disconnects the\n" +
					"volume's NBD clients. Unmount and detach first, then attach again:\n" +
					"Example:\n   umount /mnt && blockd detach /dev/nbd0\n   blockd snapshot restore vol0 before-upgrade\n   blockd attach nbd vol0 && mount /dev/nbd0 /mnt",
				Flags: volClientFlags(), Action: snapshotCmd(2, snapRestore)},
		},
	})
}

// commandPath is the command's name under its parent ("volume info",
// "snapshot create") for error prefixes.
func commandPath(c *cli.Context) string {
	for _, p := range c.Lineage()[1:] {
		if p.Command != nil && p.Command.Name != "" {
			return p.Command.Name + " " + c.Command.Name
		}
	}
	return "volume " + c.Command.Name
}

// snapAnswerTimeout bounds one call to the primary.
const snapAnswerTimeout = 10 * time.Minute

// snapCtx is one invocation of a snapshot subcommand.
type snapCtx struct {
	*volCtx
	volume, snap string
}

// snapshotCmd checks the arguments (nargs: VOLUME, or VOLUME SNAP) and
// the flags, then runs fn.
func snapshotCmd(nargs int, fn func(*snapCtx) error) cli.ActionFunc {
	return volumeCmd(func(v *volCtx) error {
		want := "VOLUME SNAP"
		if nargs == 1 {
			want = "VOLUME"
		}
		if len(v.args) != nargs {
			return fmt.Errorf("want %s, got %d argument(s)", want, len(v.args))
		}
		s := &snapCtx{volCtx: v, volume: v.args[0]}
		if err := checkVolumeName(s.volume); err != nil {
			return err
		}
		if nargs == 2 {
			s.snap = v.args[1]
			if err := blockvol.CheckSnapshotName(s.snap); err != nil {
				return err
			}
		}
		return fn(s)
	})
}

// primary asks the master for the volume's primary and returns a client
// of its admin API. Under TLS the server must present the certificate of
// the server ID the master names.
func (s *snapCtx) primary() (*api.Client, *api.PrimaryInfo, error) {
	p, err := s.cl.PrimaryOf(s.ctx, s.volume)
	if err != nil {
		if api.IsCode(err, api.CodeNotFound) {
			// Not wrapped: the error printer shows an *api.Error alone.
			return nil, nil, fmt.Errorf("unknown volume %s (%v)", api.QuoteName(s.volume), err)
		}
		return nil, nil, err
	}
	if p.HTTPAddr == "" {
		return nil, nil, fmt.Errorf("volume %s: its primary, server %s, has no admin API address (start it with blockd server --http ADDR)", s.volume, p.ServerID)
	}
	creds, err := loadTLS(s.c)
	if err != nil {
		return nil, nil, err
	}
	var sc *api.Client
	if creds == nil {
		sc = api.NewClient([]string{p.HTTPAddr})
	} else {
		sc = api.NewClientTLS([]string{p.HTTPAddr}, creds.ClientConfig(tlsauth.Expect(tlsauth.KindServer, p.ServerID)))
	}
	// A create waits for the replicas' flush and a restore rewrites what
	// changed: both take their time (Ctrl-C ends the wait).
	sc.AnswerTimeout = snapAnswerTimeout
	sc.RetryFor = s.c.Duration("wait")
	return sc, p, nil
}

// call runs fn against the volume's primary. A not_primary answer (a
// failover between the master's answer and the call: the server refused
// before doing anything) asks the master again, for up to --wait.
func (s *snapCtx) call(fn func(*api.Client) error) error {
	deadline := time.Now().Add(s.c.Duration("wait"))
	for {
		sc, _, err := s.primary()
		if err != nil {
			return err
		}
		err = fn(sc)
		if !api.IsCode(err, api.CodeNotPrimary) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-s.ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func snapCreate(s *snapCtx) error {
	var info *api.SnapshotInfo
	err := s.call(func(sc *api.Client) (err error) {
		info, err = sc.CreateSnapshot(s.ctx, s.volume, s.snap)
		return err
	})
	if err != nil {
		return err
	}
	if s.json {
		return s.emitJSON(info)
	}
	fmt.Fprintf(s.out, "snapshot %s@%s created: id %d, lsn %d, size %s, epoch %d\n", s.volume, info.Name, info.ID, info.LSN, volHumanSize(info.SizeBytes), info.Epoch)
	return nil
}

func snapList(s *snapCtx) error {
	var list []api.SnapshotInfo
	err := s.call(func(sc *api.Client) (err error) {
		list, err = sc.ListSnapshots(s.ctx, s.volume)
		return err
	})
	if err != nil {
		return err
	}
	if s.json {
		return s.emitJSON(list)
	}
	if len(list) == 0 {
		fmt.Fprintf(s.out, "volume %s has no snapshots\n", s.volume)
		return nil
	}
	w := tabwriter.NewWriter(s.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tCREATED\tLSN\tSIZE\tHELD\tID")
	for _, i := range list {
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%d\n", i.Name, i.Created.Local().Format(time.RFC3339), i.LSN, volHumanSize(i.SizeBytes), volHumanSize(i.HeldBytes), i.ID)
	}
	return w.Flush()
}

func snapDelete(s *snapCtx) error {
	err := s.call(func(sc *api.Client) error { return sc.DeleteSnapshot(s.ctx, s.volume, s.snap) })
	if err != nil {
		return err
	}
	if s.json {
		return s.emitJSON(map[string]any{"volume": s.volume, "name": s.snap, "deleted": true})
	}
	fmt.Fprintf(s.out, "snapshot %s@%s deleted\n", s.volume, s.snap)
	return nil
}

// reconnectNote is what restore tells every user.
const reconnectNote = "clients must reconnect: the volume's NBD clients were disconnected; unmount and detach before a restore, attach again after it"

func snapRestore(s *snapCtx) error {
	var info *api.SnapshotInfo
	err := s.call(func(sc *api.Client) (err error) {
		info, err = sc.RestoreSnapshot(s.ctx, s.volume, s.snap)
		return err
	})
	if err != nil {
		return err
	}
	if s.json {
		fmt.Fprintf(os.Stderr, "blockd: %s\n", reconnectNote)
		return s.emitJSON(map[string]any{"volume": s.volume, "name": info.Name, "restored": true, "lsn": info.LSN,
			"epoch": info.Epoch, "reconnect": true, "snapshot": info})
	}
	fmt.Fprintf(s.out, "volume %s restored to snapshot %s (lsn %d)\n%s\n", s.volume, info.Name, info.LSN, reconnectNote)
	return nil
}
