package vfs

import (
	"fmt"
	"os"
	"strconv"
)

// FaultsEnv names the environment variable that makes a whole process run
// on an ErrorFS: when it is set at start, Default (the real OS file
// system) is wrapped with the rules ParseRules reads from it, so the real
// blockd processes of a multi-process test get faults on real disks.
// FaultsSeedEnv seeds the probabilistic rules (default 1). A bad value
// stops the process at start with a message naming the variable.
const (
	FaultsEnv     = "BLOCKD_VFS_FAULTS"
	FaultsSeedEnv = "BLOCKD_VFS_FAULTS_SEED"
)

func init() {
	fs, err := faultsFromEnv(Default, os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	Default = fs
}

// faultsFromEnv returns base, or base wrapped in an ErrorFS when
// FaultsEnv is set.
func faultsFromEnv(base FS, getenv func(string) string) (FS, error) {
	spec := getenv(FaultsEnv)
	if spec == "" {
		return base, nil
	}
	rules, err := ParseRules(spec)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", FaultsEnv, err)
	}
	if len(rules) == 0 {
		return nil, fmt.Errorf("%s=%q: no rules", FaultsEnv, spec)
	}
	seed := uint64(1)
	if s := getenv(FaultsSeedEnv); s != "" {
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			return nil, fmt.Errorf("%s=%q: %w", FaultsSeedEnv, s, err)
		}
	}
	e := NewErrorFS(base, seed)
	for _, r := range rules {
		e.AddRule(r)
	}
	return e, nil
}
