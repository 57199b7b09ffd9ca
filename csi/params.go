package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

// The pure half of the driver: StorageClass parameters, capacity ranges,
// volume capabilities and names, decided without a master or a kernel.

// StorageClass parameters the driver understands (anything prefixed
// csi.storage.k8s.io/ is the CO's own and ignored).
const (
	ParamPreset     = "preset"     // database | general | throughput
	ParamRF         = "rf"         // replication factor
	ParamDurability = "durability" // best_effort | sync_all | sync_quorum
	ParamMinCopies  = "minCopies"  // durable copies a flush needs
	ParamWALSize    = "walSize"    // WAL bytes (an integer)
	ParamBlockSize  = "blockSize"  // logical block size of the volume
)

// DefaultVolumeSize is the size of a volume created without a capacity range.
const DefaultVolumeSize int64 = 1 << 30

// sizeAlign is what every volume size is rounded up to: the largest block
// size a StorageClass may choose is not known before resolution, so sizes
// are kept at multiples of the default block size (4 KiB).
const sizeAlign int64 = 4096

// Supported file systems for mount volumes ("" means DefaultFSType).
var fsTypes = map[string]bool{"": true, "ext4": true, "xfs": true}

// DefaultFSType is made on a blank volume when the capability names none.
const DefaultFSType = "ext4"

// Params are a create request's policy, parsed.
type Params struct {
	Preset     string
	RF         int
	Durability string
	MinCopies  int
	WALSize    int64
	BlockSize  int
}

// ParseParams parses StorageClass parameters. An unknown key is an error
// naming it (a typo must not silently give another policy).
func ParseParams(in map[string]string) (Params, error) {
	var p Params
	atoi := func(k, v string) (int64, error) {
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil || n <= 0 {
			return 0, fmt.Errorf("parameter %s=%q: want a positive integer", k, v)
		}
		return n, nil
	}
	keys := make([]string, 0, len(in))
	for k := range in {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := in[k]
		switch k {
		case ParamPreset:
			p.Preset = v
		case ParamDurability:
			switch v {
			case api.DurabilityBestEffort, api.DurabilitySyncAll, api.DurabilitySyncQuorum:
			default:
				return Params{}, fmt.Errorf("parameter %s=%q: want best_effort, sync_all or sync_quorum", k, v)
			}
			p.Durability = v
		case ParamRF, ParamMinCopies, ParamBlockSize:
			n, err := atoi(k, v)
			if err != nil {
				return Params{}, err
			}
			if n > 1<<20 {
				return Params{}, fmt.Errorf("parameter %s=%q is too large", k, v)
			}
			switch k {
			case ParamRF:
				p.RF = int(n)
			case ParamMinCopies:
				p.MinCopies = int(n)
			default:
				p.BlockSize = int(n)
			}
		case ParamWALSize:
			n, err := atoi(k, v)
			if err != nil {
				return Params{}, err
			}
			p.WALSize = n
		default:
			if strings.HasPrefix(k, "csi.storage.k8s.io/") {
				continue
			}
			return Params{}, fmt.Errorf("unknown parameter %q (known: %s, %s, %s, %s, %s, %s)", k,
				ParamPreset, ParamRF, ParamDurability, ParamMinCopies, ParamWALSize, ParamBlockSize)
		}
	}
	return p, nil
}

// Request turns the parameters into the master's create request.
func (p Params) Request(name string, size int64) api.CreateVolumeRequest {
	return api.CreateVolumeRequest{Name: name, SizeBytes: size, Preset: p.Preset, RF: p.RF,
		Durability: p.Durability, MinCopies: p.MinCopies, WALSizeBytes: p.WALSize, BlockSize: p.BlockSize,
		RequestID: requestID(name)}
}

// Matches reports whether an existing volume satisfies the parameters:
// every parameter that was set must equal the volume's value. It returns
// the first difference.
func (p Params) Matches(v *api.VolumeInfo) (bool, string) {
	switch {
	case p.Preset != "" && p.Preset != v.Preset:
		return false, fmt.Sprintf("preset %q, the volume has %q", p.Preset, v.Preset)
	case p.RF != 0 && p.RF != v.RF:
		return false, fmt.Sprintf("rf %d, the volume has %d", p.RF, v.RF)
	case p.Durability != "" && p.Durability != v.Durability:
		return false, fmt.Sprintf("durability %s, the volume has %s", p.Durability, v.Durability)
	case p.MinCopies != 0 && p.MinCopies != v.MinCopies:
		return false, fmt.Sprintf("minCopies %d, the volume has %d", p.MinCopies, v.MinCopies)
	case p.WALSize != 0 && p.WALSize != v.WALSizeBytes:
		return false, fmt.Sprintf("walSize %d, the volume has %d", p.WALSize, v.WALSizeBytes)
	case p.BlockSize != 0 && p.BlockSize != v.BlockSize:
		return false, fmt.Sprintf("blockSize %d, the volume has %d", p.BlockSize, v.BlockSize)
	}
	return true, ""
}

// requestID is the master's idempotency key of a create: a retry of the
// same CSI name, from this or another controller replica, finds the volume
// that the first attempt committed.
func requestID(name string) string {
	h := sha256.Sum256([]byte("csi\x00" + name))
	return "csi-" + hex.EncodeToString(h[:12])
}

var volNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// VolumeName maps a CSI volume name to a blockd volume name (and so the
// CSI volume ID): the name itself when blockd accepts it (Kubernetes'
// pvc-<uuid> does), otherwise "csi-" and a hash of it.
func VolumeName(csiName string) string {
	if volNameRE.MatchString(csiName) {
		return csiName
	}
	return "csi-" + nameHash(csiName)
}

// nameHash is the hex of the first 16 bytes of name's SHA-256.
func nameHash(name string) string {
	h := sha256.Sum256([]byte(name))
	return hex.EncodeToString(h[:16])
}

// SizeFor decides a new volume's size from a capacity range: the required
// bytes rounded up to the block size, DefaultVolumeSize (or the limit, if
// smaller) when nothing is required. It fails with OutOfRange when no
// size fits, InvalidArgument when the range is malformed.
func SizeFor(r *csi.CapacityRange) (int64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, status.Errorf(codes.InvalidArgument, "capacity range: negative bytes (required %d, limit %d)", req, lim)
	}
	if lim > 0 && lim < req {
		return 0, status.Errorf(codes.OutOfRange, "capacity range: limit %d is below required %d", lim, req)
	}
	size := roundUp(req)
	if req == 0 {
		size = DefaultVolumeSize
		if lim > 0 && lim < size {
			size = lim / sizeAlign * sizeAlign
		}
	}
	if size <= 0 || (lim > 0 && size > lim) {
		return 0, status.Errorf(codes.OutOfRange, "capacity range [%d, %d]: no multiple of %d bytes fits", req, lim, sizeAlign)
	}
	return size, nil
}

// SizeFits reports whether an existing size satisfies a capacity range.
func SizeFits(size int64, r *csi.CapacityRange) bool {
	if r == nil {
		return true
	}
	return size >= r.GetRequiredBytes() && (r.GetLimitBytes() == 0 || size <= r.GetLimitBytes())
}

func roundUp(n int64) int64 { return (n + sizeAlign - 1) / sizeAlign * sizeAlign }

// CheckCapability tells whether blockd can serve a volume capability: one
// node at a time (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY), block or
// mount with ext4 or xfs. The error names the cause; the code is
// InvalidArgument.
func CheckCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return status.Error(codes.InvalidArgument, "volume capability missing")
	}
	switch {
	case c.GetBlock() != nil:
	case c.GetMount() != nil:
		if fs := c.GetMount().GetFsType(); !fsTypes[fs] {
			return status.Errorf(codes.InvalidArgument, "file system %q is not supported (ext4, xfs)", fs)
		}
	default:
		return status.Error(codes.InvalidArgument, "volume capability has no access type (block or mount)")
	}
	m := c.GetAccessMode().GetMode()
	switch m {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
		return nil
	case csi.VolumeCapability_AccessMode_UNKNOWN:
		return status.Error(codes.InvalidArgument, "volume capability has no access mode")
	}
	return status.Errorf(codes.InvalidArgument, "access mode %s is not supported: a blockd volume is attached by one node at a time (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY)", m)
}

// CheckCapabilities checks a non-empty list.
func CheckCapabilities(cs []*csi.VolumeCapability) error {
	if len(cs) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	for _, c := range cs {
		if err := CheckCapability(c); err != nil {
			return err
		}
	}
	return nil
}
