package main

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
)

// Checks of what the user typed, made before anything is sent or started,
// each naming the flag, the value and what is accepted.

const sizeForms = "a number of bytes or a number with a unit: 4096, 512MiB, 10GiB, 1.5TB"

// maxSize is the largest size a flag takes (4 EiB; the engine's offsets are
// int64).
const maxSize = 1 << 62

// parseSize reads a size in human units. what names the input in errors
// ("--size", "--volume size"). Zero and negative sizes are refused.
func parseSize(what, s string) (int64, error) {
	t := strings.TrimSpace(s)
	if strings.HasPrefix(t, "-") {
		return 0, fmt.Errorf("%s %s: a size cannot be negative; use %s", what, api.QuoteName(s), sizeForms)
	}
	n, err := humanize.ParseBytes(t)
	if err != nil {
		return 0, fmt.Errorf("%s %s: not a size; use %s", what, api.QuoteName(s), sizeForms)
	}
	if n == 0 {
		return 0, fmt.Errorf("%s %s: a size must be more than 0; use %s", what, api.QuoteName(s), sizeForms)
	}
	if n > maxSize {
		return 0, fmt.Errorf("%s %s: too large (at most 4EiB)", what, api.QuoteName(s))
	}
	return int64(n), nil
}

// positiveIntFlag refuses an explicit value below 1 for a flag whose unset
// value means "the preset's" (rest says what the flag counts).
func positiveIntFlag(c *cli.Context, name, rest string) error {
	if !c.IsSet(name) {
		return nil
	}
	if v := c.Int(name); v < 1 {
		return fmt.Errorf("--%s %d: %s; use 1 or more, or leave --%s out for the preset's", name, v, rest, name)
	}
	return nil
}

// checkVolumeName refuses a name the master would refuse, without echoing a
// long one back whole.
func checkVolumeName(name string) error {
	if err := api.CheckVolumeName(name); err != nil {
		return fmt.Errorf("%s", err.(*api.Error).Message)
	}
	return nil
}

// masterAddrs reads --master: HOST:PORT (or http://HOST:PORT, https://...)
// entries, comma-separated.
func masterAddrs(s string) ([]string, error) {
	addrs := api.ParseAddrs(s)
	if len(addrs) == 0 {
		return nil, fmt.Errorf("--master %s: want HOST:PORT[,HOST:PORT...], e.g. %s", api.QuoteName(s), api.DefaultMaster)
	}
	for _, a := range addrs {
		hp := a
		if i := strings.Index(hp, "://"); i >= 0 {
			if scheme := hp[:i]; scheme != "http" && scheme != "https" {
				return nil, fmt.Errorf("--master %s: scheme %s: use http:// or https:// (or none)", api.QuoteName(a), api.QuoteName(scheme))
			}
			hp = strings.TrimRight(hp[i+3:], "/")
		}
		host, port, err := net.SplitHostPort(hp)
		if err == nil && strings.ContainsAny(host, " \t/") {
			err = errors.New("bad host")
		}
		if err == nil {
			var n int
			n, err = strconv.Atoi(port)
			if err == nil && (n < 1 || n > 65535) {
				err = errors.New("bad port")
			}
		}
		if err != nil {
			return nil, fmt.Errorf("--master %s: want HOST:PORT with a port of 1 to 65535, e.g. %s", api.QuoteName(a), api.DefaultMaster)
		}
	}
	return addrs, nil
}
