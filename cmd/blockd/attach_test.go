package main

import (
	"testing"
	"time"

	"github.com/urfave/cli/v2"
)

// TestFlagsAfterTheName: `blockd attach nbd NAME --device /dev/nbd1` (flags
// after the name, as the CLI's usage writes them) parses like flags first;
// run (flagsFirst) is the one place that reorders them.
func TestFlagsAfterTheName(t *testing.T) {
	type got struct {
		args   []string
		device string
		conns  int
		giveUp time.Duration
		json   string
	}
	run := func(argv ...string) (got, error) {
		var g got
		app := &cli.App{Name: "blockd", Commands: []*cli.Command{{Name: "attach", Subcommands: []*cli.Command{{
			Name: "nbd",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "device"},
				&cli.IntFlag{Name: "connections", Value: 2},
				&cli.DurationFlag{Name: "give-up", Value: time.Minute},
				&cli.StringFlag{Name: "output", Aliases: []string{"o"}},
			},
			Action: func(c *cli.Context) error {
				g = got{c.Args().Slice(), c.String("device"), c.Int("connections"), c.Duration("give-up"), c.String("output")}
				return nil
			},
		}}}}}
		err := run(app, append([]string{"blockd", "attach", "nbd"}, argv...))
		return g, err
	}
	for _, argv := range [][]string{
		{"--device", "/dev/nbd1", "--connections", "4", "--give-up", "10s", "-o", "json", "vol0"},
		{"vol0", "--device", "/dev/nbd1", "--connections", "4", "--give-up", "10s", "-o", "json"},
		{"--device=/dev/nbd1", "vol0", "--connections=4", "--give-up=10s", "-o", "json"},
	} {
		g, err := run(argv...)
		if err != nil {
			t.Fatalf("%v: %v", argv, err)
		}
		if len(g.args) != 1 || g.args[0] != "vol0" || g.device != "/dev/nbd1" || g.conns != 4 || g.giveUp != 10*time.Second || g.json != "json" {
			t.Errorf("%v parsed as %+v", argv, g)
		}
	}
	if g, err := run("vol0"); err != nil || g.conns != 2 || g.device != "" {
		t.Errorf("defaults: %+v %v", g, err)
	}
	if _, err := run("vol0", "--bogus"); err == nil {
		t.Errorf("an unknown flag after the name was accepted")
	}
	if g, _ := run("vol0", "--device", "/dev/nbd2", "extra"); len(g.args) != 2 {
		t.Errorf("a second positional argument was lost: %+v", g)
	}
}
