// Command blockd is the CLI. It wires the packages together: the NBD
// protocol and clients, the engine, replication and the master's decisions
// live in them, not here. What cmd holds is the CLI's own: reading and
// checking what the user typed (run/flagsFirst, input.go), printing the
// answers (text or JSON), and the sequence of steps of single commands
// (serve's create-on-first-start, attach ublk's choice between a local
// server and NBD). Each group of commands lives in its own file and adds
// itself to the app with register.
package main

import (
	"fmt"
	"os"
	"runtime/pprof"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/vfs"
)

var commands []*cli.Command

// register adds a top-level command; files call it from init.
func register(c *cli.Command) { commands = append(commands, c) }

// newApp is the whole CLI; main runs it on os.Args and tests in process.
func newApp() *cli.App {
	decorate(commands, "") // help.go: examples, one-line usage errors
	return &cli.App{
		Name:     "blockd",
		Usage:    "replicated block storage over NBD and ublk",
		Commands: commands,
		// Shell completion (blockd completion bash|zsh prints the script).
		EnableBashCompletion: true,
		OnUsageError:         usageError("blockd"),
		// One-line reason on stderr and a non-zero exit (main prints it).
		ExitErrHandler: func(_ *cli.Context, err error) {},
	}
}

// run parses args (flags may follow positional arguments) and runs the
// command.
func run(app *cli.App, args []string) error {
	if len(args) > 1 && args[len(args)-1] == completionFlag {
		return app.Run(args) // the shell asks for completions: as typed
	}
	if err := checkCommand(app.Commands, args); err != nil {
		return err
	}
	return app.Run(flagsFirst(app.Commands, args))
}

func main() {
	// Fault injection for multi-process tests: BLOCKD_VFS_FAULTS wraps
	// every file operation of this process (vfs.FaultsEnv).
	fs, err := vfs.FaultsFromEnv(vfs.Default, os.Getenv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: %s\n", oneLine(err))
		os.Exit(2)
	}
	vfs.Default = fs
	stopProfile := startProfile()
	err = run(newApp(), os.Args)
	stopProfile()
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: %s\n", oneLine(err))
		os.Exit(1)
	}
}

// oneLine is an error's text on a single line.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

// startProfile writes a CPU profile to $BLOCKD_CPUPROFILE for the life of
// the command (used by bench/run.sh PROFILE=1 to see where a server spends).
func startProfile() (stop func()) {
	path := os.Getenv("BLOCKD_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err == nil {
		err = pprof.StartCPUProfile(f)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: BLOCKD_CPUPROFILE: %v\n", err)
		return func() {}
	}
	return func() { pprof.StopCPUProfile(); f.Close() }
}

// flagsFirst moves a command's flags in front of its positional arguments,
// the one place the CLI does so. Usage lines write flags after the names
// (`blockd volume info NAME -o json`), but urfave/cli stops parsing flags
// at the first positional argument. Flags that take a value keep it (even
// one that starts with "-", like --size -5GiB, which is then refused by
// the size check); "--" ends the flags.
func flagsFirst(cmds []*cli.Command, args []string) []string {
	if len(args) < 2 {
		return args
	}
	out := []string{args[0]}
	var cmd *cli.Command
	i := 1
	for ; i < len(args); i++ {
		c := findCommand(cmds, args[i])
		if c == nil {
			break
		}
		out, cmd, cmds = append(out, args[i]), c, c.Subcommands
	}
	if cmd == nil {
		return args
	}
	var flags, pos []string
	rest := args[i:]
	for j := 0; j < len(rest); j++ {
		a := rest[j]
		switch {
		case a == "--":
			pos = append(pos, rest[j+1:]...)
			j = len(rest)
		case strings.HasPrefix(a, "-") && a != "-":
			flags = append(flags, a)
			name := strings.TrimLeft(a, "-")
			if !strings.Contains(name, "=") && takesValue(cmd, name) && j+1 < len(rest) {
				flags = append(flags, rest[j+1])
				j++
			}
		default:
			pos = append(pos, a)
		}
	}
	out = append(out, flags...)
	if len(pos) > 0 {
		out = append(append(out, "--"), pos...)
	}
	return out
}

func findCommand(cmds []*cli.Command, name string) *cli.Command {
	for _, c := range cmds {
		if c.HasName(name) {
			return c
		}
	}
	return nil
}

func takesValue(cmd *cli.Command, name string) bool {
	for _, f := range cmd.Flags {
		for _, n := range f.Names() {
			if n == name {
				_, isBool := f.(*cli.BoolFlag)
				return !isBool
			}
		}
	}
	return false
}
