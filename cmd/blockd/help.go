package main

// What every command shares about help and mistakes: an example in each
// command's --help, a one-line error for a wrong flag, a missing required
// flag or an unknown command (never a help page dumped after it), and
// shell completion for bash and zsh.

import (
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/urfave/cli/v2"
)

// examples are shown under each command's --help (by command path).
var examples = map[string]string{
	"serve":            "blockd serve\n  blockd serve --data /var/lib/blockd --volume vol0:20GiB --nbd 0.0.0.0:10809 --insecure",
	"server":           "blockd server --id s1 --data /var/lib/blockd --master 10.0.0.1:9333 --listen 10.0.0.11:9701 --nbd 10.0.0.11:10809 --metrics 10.0.0.11:9100",
	"master":           "blockd master --data /var/lib/blockd-master --api 127.0.0.1:9333",
	"status":           "blockd status --master 127.0.0.1:9333",
	"attach":           "blockd attach nbd db --master 127.0.0.1:9333",
	"attach nbd":       "blockd attach nbd db --master 127.0.0.1:9333 --connections 4",
	"attach ublk":      "blockd attach ublk vol0",
	"detach":           "blockd detach /dev/nbd0",
	"csi":              "blockd csi --mode both --endpoint unix:///csi/csi.sock --node-id $NODE --master 10.0.0.1:9333",
	"tls":              "blockd tls init --dir pki --master m1 --server s1,s2 --client alice",
	"tls init":         "blockd tls init --dir pki --master m1 --master m2 --server s1 --server s2 --client alice --host 10.0.0.1",
	"volume":           "blockd volume create db --size 10GiB --rf 3 --durability sync_all",
	"volume create":    "blockd volume create db --size 10GiB --rf 3 --durability sync_all\n  blockd volume create scratch --size 1GiB --preset throughput -o json",
	"volume list":      "blockd volume list -o json",
	"volume info":      "blockd volume info db\n  blockd volume info db --watch          (replica states and rebuild progress, until Ctrl-C)",
	"volume delete":    "blockd volume delete scratch",
	"volume expand":    "blockd volume expand db --size 20GiB",
	"volume update":    "blockd volume update db --min-copies 2\n  blockd volume update db --allow alice --allow bob:ro",
	"volume plan":      "blockd volume plan db --size 10GiB --rf 3      (what create would do, and why a server is refused)",
	"volume resolve":   "blockd volume resolve --size 10GiB --preset database -o json",
	"volume preflight": "blockd volume preflight db",
	"volume promote":   "blockd volume promote db --target s2",
	"completion":       "source <(blockd completion bash)     # or, in ~/.zshrc: source <(blockd completion zsh)",
}

// decorate gives every command its example, a one-line usage error and
// required flags checked by the command itself (one line, no help page).
func decorate(cmds []*cli.Command, parent string) {
	for _, c := range cmds {
		path := strings.TrimSpace(parent + " " + c.Name)
		if ex, ok := examples[path]; ok && !strings.Contains(c.Description, "Example") {
			if c.Description != "" {
				c.Description += "\n\n"
			}
			c.Description += "Example:\n  " + ex
		}
		c.OnUsageError = usageError(path)
		if req := stripRequired(c.Flags); len(req) > 0 && c.Action != nil {
			action := c.Action
			c.Action = func(cc *cli.Context) error {
				for _, f := range req {
					if !cc.IsSet(f) {
						return fmt.Errorf("%s: --%s is required (see blockd %s --help)", path, f, path)
					}
				}
				return action(cc)
			}
		}
		decorate(c.Subcommands, path)
	}
}

// badValueRE is the flag library's parse error for a value.
var badValueRE = regexp.MustCompile(`^invalid value "(.*)" for flag -+([A-Za-z0-9-]+): `)

func usageError(path string) cli.OnUsageErrorFunc {
	return func(_ *cli.Context, err error, _ bool) error {
		msg := err.Error()
		if m := badValueRE.FindStringSubmatch(msg); m != nil {
			msg = fmt.Sprintf("--%s %q: not a valid value", m[2], m[1])
		}
		if f, ok := strings.CutPrefix(msg, "flag provided but not defined: "); ok {
			msg = "unknown flag -" + strings.TrimLeft(f, "-")
			if len(strings.TrimLeft(f, "-")) > 1 {
				msg = "unknown flag --" + strings.TrimLeft(f, "-")
			}
		}
		return fmt.Errorf("%s: %s (see blockd %s --help)", path, msg, path)
	}
}

// stripRequired clears the Required mark of flags (the library would
// print the whole help page before its error) and returns their names.
func stripRequired(flags []cli.Flag) []string {
	var names []string
	for _, f := range flags {
		switch x := f.(type) {
		case *cli.StringFlag:
			if x.Required {
				x.Required, names = false, append(names, x.Name)
			}
		case *cli.IntFlag:
			if x.Required {
				x.Required, names = false, append(names, x.Name)
			}
		case *cli.DurationFlag:
			if x.Required {
				x.Required, names = false, append(names, x.Name)
			}
		case *cli.StringSliceFlag:
			if x.Required {
				x.Required, names = false, append(names, x.Name)
			}
		}
	}
	return names
}

// checkCommand refuses an unknown command or subcommand in one line that
// lists the ones there are.
func checkCommand(cmds []*cli.Command, args []string) error {
	path := ""
	for i := 1; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "-") || a == "help" || a == "h" {
			return nil
		}
		c := findCommand(cmds, a)
		if c == nil {
			var names []string
			for _, x := range cmds {
				if !x.Hidden && x.Name != "help" {
					names = append(names, x.Name)
				}
			}
			sort.Strings(names)
			where, help := "", "blockd --help"
			if path != "" {
				where, help = path+": ", "blockd "+path+" --help"
			}
			return fmt.Errorf("%sunknown command %q; commands: %s (see %s)", where, a, strings.Join(names, ", "), help)
		}
		path = strings.TrimSpace(path + " " + c.Name)
		var subs []*cli.Command
		for _, s := range c.Subcommands {
			if s.Name != "help" { // the library adds one to commands it has set up
				subs = append(subs, s)
			}
		}
		if len(subs) == 0 {
			return nil
		}
		cmds = subs
	}
	return nil
}

const completionFlag = "--generate-bash-completion"

const bashCompletion = `# bash completion for blockd: source <(blockd completion bash)
_blockd_complete() {
  local cur="${COMP_WORDS[COMP_CWORD]}" words
  if [[ "$cur" == -* ]]; then
    words=$("${COMP_WORDS[@]:0:$COMP_CWORD}" "$cur" ` + completionFlag + ` 2>/dev/null)
  else
    words=$("${COMP_WORDS[@]:0:$COMP_CWORD}" ` + completionFlag + ` 2>/dev/null)
  fi
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -o bashdefault -o default -F _blockd_complete blockd
`

const zshCompletion = `#compdef blockd
# zsh completion for blockd: source <(blockd completion zsh)
_blockd() {
  local cur=${words[CURRENT]}
  local -a opts
  if [[ "$cur" == -* ]]; then
    opts=("${(@f)$(${words[1,CURRENT-1]} $cur ` + completionFlag + ` 2>/dev/null)}")
  else
    opts=("${(@f)$(${words[1,CURRENT-1]} ` + completionFlag + ` 2>/dev/null)}")
  fi
  opts=(${opts:#})
  if (( ${#opts} )); then
    compadd -a opts
  else
    _files
  fi
}
if (( $+functions[compdef] )); then
  compdef _blockd blockd
fi
`

func init() {
	register(&cli.Command{
		Name:      "completion",
		Usage:     "print the shell completion script for bash or zsh",
		ArgsUsage: "bash|zsh",
		Action: func(c *cli.Context) error {
			switch c.Args().First() {
			case "bash":
				fmt.Fprint(c.App.Writer, bashCompletion)
			case "zsh":
				fmt.Fprint(c.App.Writer, zshCompletion)
			default:
				return fmt.Errorf("completion: want bash or zsh, e.g. source <(blockd completion bash)")
			}
			return nil
		},
	})
}
