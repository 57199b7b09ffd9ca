package kernel

import (
	"fmt"
	"os"
)

// Resize sets the size of the connected device /dev/nbd<index> serving
// volume (its backend identifier, which the kernel checks) to size bytes,
// without touching its connections: the online half of an expand, once
// the volume's primary serves the larger size. The device's keeper, if
// any, keeps working (its next reconnect sees the same size).
func Resize(index int, volume string, size uint64) error {
	if size == 0 {
		return fmt.Errorf("resize /dev/nbd%d: size 0", index)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("resize /dev/nbd%d: %w", index, ErrNotRoot)
	}
	nl, err := openNBD()
	if err != nil {
		return fmt.Errorf("resize /dev/nbd%d: %w", index, err)
	}
	defer nl.Close()
	var a attrBuf
	a.u32(attrIndex, uint32(index))
	a.u64(attrSizeBytes, size)
	if volume != "" {
		a.str(attrBackendID, volume)
	}
	if _, err := nl.request(nl.family, cmdReconfigure, nbdGenlVer, a.bytes()); err != nil {
		return fmt.Errorf("resize /dev/nbd%d to %d bytes: %w", index, size, mapErr("reconfigure", err))
	}
	return nil
}
