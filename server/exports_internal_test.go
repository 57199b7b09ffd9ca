package server

import (
	"fmt"
	"testing"

	"github.com/blockd/blockd/blockvol"
)

func TestChangedExtents(t *testing.T) {
	rs := []blockvol.Range{{Off: 0, Len: 4096}, {Off: 10 << 20, Len: 64 << 10}, {Off: 100 << 20, Len: 1 << 20}}
	cases := []struct {
		off, n int64
		want   string
	}{
		{0, 8192, "[{0 4096 1} {4096 4096 0}]"},
		{4096, 4096, "[{4096 4096 0}]"},
		{(10 << 20) + 4096, 8192, fmt.Sprintf("[{%d 8192 1}]", (10<<20)+4096)},
		{(10 << 20) - 4096, 8192, fmt.Sprintf("[{%d 4096 0} {%d 4096 1}]", (10<<20)-4096, 10<<20)},
		{200 << 20, 4096, fmt.Sprintf("[{%d 4096 0}]", 200<<20)},
		{0, 101 << 20, fmt.Sprintf("[{0 4096 1} {4096 %d 0} {%d %d 1} {%d %d 0} {%d %d 1}]",
			(10<<20)-4096, 10<<20, 64<<10, (10<<20)+(64<<10), (90<<20)-(64<<10), 100<<20, 1<<20)},
	}
	for _, c := range cases {
		if got := fmt.Sprint(changedExtents(rs, c.off, c.n)); got != c.want {
			t.Errorf("changedExtents(%d, %d) = %s, want %s", c.off, c.n, got, c.want)
		}
	}
	if got := fmt.Sprint(changedExtents(nil, 512, 512)); got != "[{512 512 0}]" {
		t.Errorf("no ranges: %s", got)
	}
}
