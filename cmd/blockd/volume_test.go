package main

import (
	"testing"

	"github.com/urfave/cli/v2"
)

func TestFlagsAfterArgs(t *testing.T) {
	var gotArgs []string
	var size, master string
	var rf int
	app := &cli.App{Name: "t", Commands: []*cli.Command{{
		Name:  "create",
		Flags: volClientFlags(volPolicyFlags()...),
		Action: func(c *cli.Context) error {
			a, err := volFlagsAfterArgs(c)
			gotArgs, size, master, rf = a, c.String("size"), c.String("master"), c.Int("rf")
			return err
		},
	}}}
	if err := app.Run([]string{"t", "create", "--rf", "3", "vol1", "--size", "10GiB", "-o", "json", "--master=a:1,b:2"}); err != nil {
		t.Fatal(err)
	}
	if len(gotArgs) != 1 || gotArgs[0] != "vol1" || size != "10GiB" || rf != 3 || master != "a:1,b:2" {
		t.Fatalf("args %q size %q rf %d master %q", gotArgs, size, rf, master)
	}
	if err := app.Run([]string{"t", "create", "vol1", "--bogus"}); err == nil {
		t.Fatal("unknown flag accepted")
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512MiB": 512 << 20, "10GiB": 10 << 30, "1TB": 1e12, "4096": 4096, "1GB": 1000001536} {
		got, err := volParseSize("size", in, 4096)
		if err != nil || got != want {
			t.Errorf("%s = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"ten", "-1G", "1ZiB"} {
		if _, err := volParseSize("size", in, 4096); err == nil {
			t.Errorf("%s accepted", in)
		}
	}
}
