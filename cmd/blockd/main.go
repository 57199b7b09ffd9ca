// Command blockd is the CLI: it wires the packages together and holds no
// logic of its own. Each group of commands lives in its own file and adds
// itself to the app with register.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
)

var commands []*cli.Command

// register adds a top-level command; files call it from init.
func register(c *cli.Command) { commands = append(commands, c) }

func main() {
	app := &cli.App{
		Name:     "blockd",
		Usage:    "replicated block storage over NBD and ublk",
		Commands: commands,
		// One-line reason on stderr and a non-zero exit, per DESIGN.md §8.
		ExitErrHandler: func(_ *cli.Context, err error) {},
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "blockd: %v\n", err)
		os.Exit(1)
	}
}
