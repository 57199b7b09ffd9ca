// Package wire is the NBD protocol's constant table, the one copy shared
// by the server (package nbd), the kernel attach handshake (nbd/kernel)
// and the userspace client (nbd/client). Values are from the NBD protocol
// description (NetworkBlockDevice/nbd doc/proto.md) and travel in network
// byte order.
package wire

// Magics.
const (
	MagicNBD             uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	MagicIHaveOpt        uint64 = 0x49484156454F5054 // "IHAVEOPT"
	MagicOptReply        uint64 = 0x3e889045565a9
	MagicRequest         uint32 = 0x25609513
	MagicSimpleReply     uint32 = 0x67446698
	MagicStructuredReply uint32 = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	HandshakeFixedNewstyle uint16 = 1 << 0
	HandshakeNoZeroes      uint16 = 1 << 1

	ClientFixedNewstyle uint32 = 1 << 0
	ClientNoZeroes      uint32 = 1 << 1
)

// Transmission flags (what the server announces for an export; the
// kernel takes them as NBD_ATTR_SERVER_FLAGS).
const (
	FlagHasFlags        uint16 = 1 << 0
	FlagReadOnly        uint16 = 1 << 1
	FlagSendFlush       uint16 = 1 << 2
	FlagSendFUA         uint16 = 1 << 3
	FlagRotational      uint16 = 1 << 4
	FlagSendTrim        uint16 = 1 << 5
	FlagSendWriteZeroes uint16 = 1 << 6
	FlagSendDF          uint16 = 1 << 7
	FlagCanMultiConn    uint16 = 1 << 8
	FlagSendResize      uint16 = 1 << 9
	FlagSendCache       uint16 = 1 << 10
	FlagSendFastZero    uint16 = 1 << 11
)

// Options.
const (
	OptExportName      uint32 = 1
	OptAbort           uint32 = 2
	OptList            uint32 = 3
	OptStartTLS        uint32 = 5
	OptInfo            uint32 = 6
	OptGo              uint32 = 7
	OptStructuredReply uint32 = 8
	OptListMetaContext uint32 = 9
	OptSetMetaContext  uint32 = 10
)

// Option replies. Error replies have RepFlagError set.
const (
	RepAck         uint32 = 1
	RepServer      uint32 = 2
	RepInfo        uint32 = 3
	RepMetaContext uint32 = 4

	RepFlagError   uint32 = 1 << 31
	RepErrUnsup    uint32 = RepFlagError + 1
	RepErrPolicy   uint32 = RepFlagError + 2
	RepErrInvalid  uint32 = RepFlagError + 3
	RepErrPlatform uint32 = RepFlagError + 4
	RepErrTLSReqd  uint32 = RepFlagError + 5
	RepErrUnknown  uint32 = RepFlagError + 6
	RepErrShutdown uint32 = RepFlagError + 7
	RepErrTooBig   uint32 = RepFlagError + 9
)

// Info types for NBD_REP_INFO.
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
)

// Commands.
const (
	CmdRead        uint16 = 0
	CmdWrite       uint16 = 1
	CmdDisc        uint16 = 2
	CmdFlush       uint16 = 3
	CmdTrim        uint16 = 4
	CmdCache       uint16 = 5
	CmdWriteZeroes uint16 = 6
	CmdBlockStatus uint16 = 7
)

// Command flags.
const (
	CmdFlagFUA      uint16 = 1 << 0
	CmdFlagNoHole   uint16 = 1 << 1
	CmdFlagDF       uint16 = 1 << 2
	CmdFlagReqOne   uint16 = 1 << 3
	CmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and types.
const (
	ReplyFlagDone uint16 = 1 << 0

	ReplyTypeNone        uint16 = 0
	ReplyTypeOffsetData  uint16 = 1
	ReplyTypeOffsetHole  uint16 = 2
	ReplyTypeBlockStatus uint16 = 5
	ReplyTypeError       uint16 = 1<<15 + 1
	ReplyTypeErrorOffset uint16 = 1<<15 + 2
)

// Error values allowed on the wire (Linux errno numbers).
const (
	ErrnoPerm     uint32 = 1
	ErrnoIO       uint32 = 5
	ErrnoNoMem    uint32 = 12
	ErrnoInval    uint32 = 22
	ErrnoNoSpc    uint32 = 28
	ErrnoOverflow uint32 = 75
	ErrnoNotSup   uint32 = 95
	ErrnoShutdown uint32 = 108
)

// base:allocation metadata context.
const (
	MetaBaseAllocation   = "base:allocation"
	MetaBaseAllocationID = 1
	StateHole            = 1 << 0
	StateZero            = 1 << 1
)

// Sizes of fixed wire structures.
const (
	RequestSize         = 28
	SimpleReplySize     = 16
	StructuredReplySize = 20
)

// Block sizes advertised with NBD_INFO_BLOCK_SIZE.
const (
	MinBlockSize       = 512
	PreferredBlockSize = 4096
)
