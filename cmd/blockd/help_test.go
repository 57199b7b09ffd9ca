package main

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestMistakesOneLine: an unknown command, an unknown flag, a bad flag
// value and a missing required flag each give one line that names the
// mistake and where to look, and nothing on stdout (no help page).
func TestMistakesOneLine(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"bogus"}, `unknown command "bogus"; commands: attach, completion,`},
		{[]string{"volume", "bogus"}, `volume: unknown command "bogus"; commands: clone, create, delete,`},
		{[]string{"volume", "list", "--bogus"}, "volume list: unknown flag --bogus (see blockd volume list --help)"},
		{[]string{"volume", "create", "x", "--rf", "abc"}, `volume create: --rf "abc": not a valid value (see blockd volume create --help)`},
		{[]string{"server", "--id", "s1"}, "server: --data is required (see blockd server --help)"},
		{[]string{"completion", "fish"}, "completion: want bash or zsh"},
	} {
		out, err := runCLI(t, c.args...)
		if err == nil {
			t.Errorf("%v: no error", c.args)
			continue
		}
		msg := oneLine(err)
		if !strings.Contains(msg, c.want) || strings.Count(err.Error(), "\n") > 0 {
			t.Errorf("%v: %q, want one line with %q", c.args, err.Error(), c.want)
		}
		if out != "" {
			t.Errorf("%v: printed on stdout too:\n%s", c.args, out)
		}
	}
}

// TestHelpExamples: every command's --help shows an example.
func TestHelpExamples(t *testing.T) {
	var walk func(path []string, cmds []*cli.Command)
	n := 0
	walk = func(path []string, cmds []*cli.Command) {
		for _, c := range cmds {
			p := append(append([]string{}, path...), c.Name)
			if _, listed := examples[strings.Join(p, " ")]; listed || c.Name == "status" {
				out, err := runCLI(t, append(p, "--help")...)
				if err != nil || !strings.Contains(out, "Example:\n") {
					t.Errorf("blockd %s --help: no example (%v):\n%s", strings.Join(p, " "), err, out)
				}
				n++
			}
			walk(p, c.Subcommands)
		}
	}
	walk(nil, newApp().Commands)
	for path := range examples {
		if findPath(newApp().Commands, strings.Fields(path)) == nil {
			t.Errorf("example for %q, which is no command", path)
		}
	}
	if n < len(examples) {
		t.Errorf("checked %d commands, %d examples", n, len(examples))
	}
}

func findPath(cmds []*cli.Command, path []string) *cli.Command {
	var c *cli.Command
	for _, name := range path {
		if c = findCommand(cmds, name); c == nil {
			return nil
		}
		cmds = c.Subcommands
	}
	return c
}

// TestCompletion: the scripts load the words from the binary, which
// lists commands, subcommands and flags.
func TestCompletion(t *testing.T) {
	for _, sh := range []string{"bash", "zsh"} {
		out, err := runCLI(t, "completion", sh)
		if err != nil || !strings.Contains(out, completionFlag) || !strings.Contains(out, "blockd") {
			t.Errorf("completion %s: %v\n%s", sh, err, out)
		}
	}
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{completionFlag}, []string{"serve", "volume", "status", "completion"}},
		{[]string{"volume", completionFlag}, []string{"create", "info", "promote"}},
		{[]string{"volume", "info", "--w", completionFlag}, []string{"--watch", "--wait"}},
	} {
		app := newApp()
		var out bytes.Buffer
		app.Writer, app.ErrWriter = &out, &out
		// The library's flag completion reads os.Args (as the shell ran it).
		saved := os.Args
		os.Args = append([]string{"blockd"}, c.args...)
		err := run(app, os.Args)
		os.Args = saved
		if err != nil {
			t.Errorf("%v: %v", c.args, err)
		}
		words := strings.Fields(out.String())
		for _, w := range c.want {
			found := false
			for _, x := range words {
				found = found || x == w
			}
			if !found {
				t.Errorf("%v: %q not offered in %v", c.args, w, words)
			}
		}
	}
}
