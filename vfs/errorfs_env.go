package vfs

import (
	"fmt"
	"strconv"
)

// FaultsEnv names the environment variable that makes a whole process run
// on an ErrorFS: the blockd command calls FaultsFromEnv at start and, when
// it is set, wraps Default (the real OS file system) with the rules
// ParseRules reads from it, so the real blockd processes of a
// multi-process test get faults on real disks. FaultsSeedEnv seeds the
// probabilistic rules (default 1). The library itself reads no
// environment: only the command does.
const (
	FaultsEnv     = "BLOCKD_VFS_FAULTS"
	FaultsSeedEnv = "BLOCKD_VFS_FAULTS_SEED"
)

// FaultsFromEnv returns base, or base wrapped in an ErrorFS when FaultsEnv
// is set (getenv is os.Getenv in the command). A bad value is an error
// naming the variable.
func FaultsFromEnv(base FS, getenv func(string) string) (FS, error) {
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
