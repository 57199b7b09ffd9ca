package main

import (
	"reflect"
	"testing"

	"github.com/urfave/cli/v2"
)

func TestFlagsFirst(t *testing.T) {
	cmds := []*cli.Command{{Name: "volume", Subcommands: []*cli.Command{
		{Name: "info", Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}},
			&cli.StringFlag{Name: "master"},
			&cli.BoolFlag{Name: "force"},
		}},
	}}}
	cases := []struct{ in, want []string }{
		{[]string{"b", "volume", "info", "vol0", "-o", "json"},
			[]string{"b", "volume", "info", "-o", "json", "--", "vol0"}},
		{[]string{"b", "volume", "info", "vol0", "--force", "--master=x:1"},
			[]string{"b", "volume", "info", "--force", "--master=x:1", "--", "vol0"}},
		{[]string{"b", "volume", "info", "-o", "json", "vol0"},
			[]string{"b", "volume", "info", "-o", "json", "--", "vol0"}},
		{[]string{"b", "volume", "info", "--", "-odd"},
			[]string{"b", "volume", "info", "--", "-odd"}},
		{[]string{"b", "unknown", "x", "-o", "json"},
			[]string{"b", "unknown", "x", "-o", "json"}},
		{[]string{"b"}, []string{"b"}},
	}
	for _, c := range cases {
		if got := flagsFirst(cmds, c.in); !reflect.DeepEqual(got, c.want) {
			t.Errorf("flagsFirst(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
