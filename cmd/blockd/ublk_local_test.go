package main

import (
	"strings"
	"testing"
	"time"
)

// TestUblkRecoveryWaitEnv: $BLOCKD_UBLK_RECOVERY_WAIT sets the server's
// recovery wait; a value that is not a positive duration is refused with
// an error naming the variable and the value.
func TestUblkRecoveryWaitEnv(t *testing.T) {
	t.Setenv("BLOCKD_UBLK_RECOVERY_WAIT", "")
	if d, err := ublkRecoveryWait(); d != 0 || err != nil {
		t.Fatalf("unset: %v %v", d, err)
	}
	t.Setenv("BLOCKD_UBLK_RECOVERY_WAIT", "15s")
	if d, err := ublkRecoveryWait(); d != 15*time.Second || err != nil {
		t.Fatalf("15s: %v %v", d, err)
	}
	for _, bad := range []string{"15", "-3s", "soon"} {
		t.Setenv("BLOCKD_UBLK_RECOVERY_WAIT", bad)
		if _, err := ublkRecoveryWait(); err == nil || !strings.Contains(err.Error(), "BLOCKD_UBLK_RECOVERY_WAIT") || !strings.Contains(err.Error(), bad) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}
