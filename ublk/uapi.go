package ublk

import "encoding/binary"

// Values from include/uapi/linux/ublk_cmd.h. Structures are encoded by hand
// (little endian, explicit offsets) so the layout is visible and tested.

// ioctl-style encoding of the ublk commands: _IOR/_IOWR('u', nr, size).
func iocEncode(dir, nr, size uint32) uint32 { return dir<<30 | size<<16 | uint32('u')<<8 | nr }

const (
	iocWrite = 1
	iocRead  = 2

	ctrlCmdSize = 32 // struct ublksrv_ctrl_cmd
	ioCmdSize   = 16 // struct ublksrv_io_cmd
	devInfoSize = 64 // struct ublksrv_ctrl_dev_info
	ioDescSize  = 24 // struct ublksrv_io_desc
)

var (
	cmdGetDevInfo        = iocEncode(iocRead, 0x02, ctrlCmdSize)
	cmdAddDev            = iocEncode(iocRead|iocWrite, 0x04, ctrlCmdSize)
	cmdDelDev            = iocEncode(iocRead|iocWrite, 0x05, ctrlCmdSize)
	cmdStartDev          = iocEncode(iocRead|iocWrite, 0x06, ctrlCmdSize)
	cmdStopDev           = iocEncode(iocRead|iocWrite, 0x07, ctrlCmdSize)
	cmdSetParams         = iocEncode(iocRead|iocWrite, 0x08, ctrlCmdSize)
	cmdStartUserRecovery = iocEncode(iocRead|iocWrite, 0x10, ctrlCmdSize)
	cmdEndUserRecovery   = iocEncode(iocRead|iocWrite, 0x11, ctrlCmdSize)
	cmdGetFeatures       = iocEncode(iocRead, 0x13, ctrlCmdSize)
	cmdDelDevAsync       = iocEncode(iocRead, 0x14, ctrlCmdSize) // Linux >= 6.9

	ioFetchReq          = iocEncode(iocRead|iocWrite, 0x20, ioCmdSize)
	ioCommitAndFetchReq = iocEncode(iocRead|iocWrite, 0x21, ioCmdSize)
)

// Feature flags (ublksrv_ctrl_dev_info.flags and GET_FEATURES).
const (
	FeatZeroCopy          = 1 << 0
	FeatURingCmdCompInTsk = 1 << 1
	FeatNeedGetData       = 1 << 2
	FeatUserRecovery      = 1 << 3
	FeatUserRecoveryReiss = 1 << 4
	FeatUnprivilegedDev   = 1 << 5
	FeatCmdIoctlEncode    = 1 << 6
	FeatUserCopy          = 1 << 7
	FeatZoned             = 1 << 8
	FeatUserRecoveryFail  = 1 << 9
)

// Device states (ublksrv_ctrl_dev_info.state).
const (
	StateDead     = 0
	StateLive     = 1
	StateQuiesced = 2
	StateFailIO   = 3
)

// I/O operations and flags (ublksrv_io_desc.op_flags).
const (
	opRead        = 0
	opWrite       = 1
	opFlush       = 2
	opDiscard     = 3
	opWriteSame   = 4
	opWriteZeroes = 5

	ioFlagFUA     = 1 << 13
	ioFlagNoUnmap = 1 << 15
)

const (
	ioResAbort = -19 // UBLK_IO_RES_ABORT == -ENODEV: the tag will not be fetched again

	cmdBufOffset     = 0 // UBLKSRV_CMD_BUF_OFFSET
	maxQueueDepth    = 4096
	maxQueues        = 4096
	maxIOBufBytes    = 1 << 25 // UBLK_IO_BUF_BITS: 32 MiB per I/O
	paramTypeBasic   = 1 << 0
	paramTypeDiscard = 1 << 1

	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3
)

// ctrlCmd is struct ublksrv_ctrl_cmd, the payload of a control URING_CMD.
type ctrlCmd struct {
	devID   uint32
	queueID uint16
	length  uint16
	addr    uint64
	data    uint64
	// dev_path_len, pad, reserved: zero (privileged devices only)
}

func (c ctrlCmd) encode(b []byte) {
	clear(b[:ctrlCmdSize])
	binary.LittleEndian.PutUint32(b[0:], c.devID)
	binary.LittleEndian.PutUint16(b[4:], c.queueID)
	binary.LittleEndian.PutUint16(b[6:], c.length)
	binary.LittleEndian.PutUint64(b[8:], c.addr)
	binary.LittleEndian.PutUint64(b[16:], c.data)
}

// DevInfo is struct ublksrv_ctrl_dev_info.
type DevInfo struct {
	NrHWQueues    uint16
	QueueDepth    uint16
	State         uint16
	MaxIOBufBytes uint32
	DevID         uint32
	ServerPID     int32
	Flags         uint64
	OwnerUID      uint32
	OwnerGID      uint32
}

func (d DevInfo) encode(b []byte) {
	clear(b[:devInfoSize])
	binary.LittleEndian.PutUint16(b[0:], d.NrHWQueues)
	binary.LittleEndian.PutUint16(b[2:], d.QueueDepth)
	binary.LittleEndian.PutUint16(b[4:], d.State)
	binary.LittleEndian.PutUint32(b[8:], d.MaxIOBufBytes)
	binary.LittleEndian.PutUint32(b[12:], d.DevID)
	binary.LittleEndian.PutUint32(b[16:], uint32(d.ServerPID))
	binary.LittleEndian.PutUint64(b[24:], d.Flags)
}

func decodeDevInfo(b []byte) DevInfo {
	return DevInfo{
		NrHWQueues:    binary.LittleEndian.Uint16(b[0:]),
		QueueDepth:    binary.LittleEndian.Uint16(b[2:]),
		State:         binary.LittleEndian.Uint16(b[4:]),
		MaxIOBufBytes: binary.LittleEndian.Uint32(b[8:]),
		DevID:         binary.LittleEndian.Uint32(b[12:]),
		ServerPID:     int32(binary.LittleEndian.Uint32(b[16:])),
		Flags:         binary.LittleEndian.Uint64(b[24:]),
		OwnerUID:      binary.LittleEndian.Uint32(b[40:]),
		OwnerGID:      binary.LittleEndian.Uint32(b[44:]),
	}
}

// params is the part of struct ublk_params this package sets: the header,
// ublk_param_basic (32 bytes at offset 8) and ublk_param_discard (20 bytes
// at offset 40). The kernel copies len bytes, so later members are not sent.
type params struct {
	// basic
	attrs           uint32
	logicalBSShift  uint8
	physicalBSShift uint8
	ioOptShift      uint8
	ioMinShift      uint8
	maxSectors      uint32
	chunkSectors    uint32
	devSectors      uint64
	// discard
	discardAlignment      uint32
	discardGranularity    uint32
	maxDiscardSectors     uint32
	maxWriteZeroesSectors uint32
	maxDiscardSegments    uint16
}

const paramsLen = 8 + 32 + 20

func (p params) encode(b []byte) {
	clear(b[:paramsLen])
	binary.LittleEndian.PutUint32(b[0:], paramsLen)
	binary.LittleEndian.PutUint32(b[4:], paramTypeBasic|paramTypeDiscard)
	bb := b[8:]
	binary.LittleEndian.PutUint32(bb[0:], p.attrs)
	bb[4], bb[5], bb[6], bb[7] = p.logicalBSShift, p.physicalBSShift, p.ioOptShift, p.ioMinShift
	binary.LittleEndian.PutUint32(bb[8:], p.maxSectors)
	binary.LittleEndian.PutUint32(bb[12:], p.chunkSectors)
	binary.LittleEndian.PutUint64(bb[16:], p.devSectors)
	// virt_boundary_mask (bb[24:32]) stays 0
	d := b[40:]
	binary.LittleEndian.PutUint32(d[0:], p.discardAlignment)
	binary.LittleEndian.PutUint32(d[4:], p.discardGranularity)
	binary.LittleEndian.PutUint32(d[8:], p.maxDiscardSectors)
	binary.LittleEndian.PutUint32(d[12:], p.maxWriteZeroesSectors)
	binary.LittleEndian.PutUint16(d[16:], p.maxDiscardSegments)
}

// ioDesc is struct ublksrv_io_desc as the driver writes it into the
// mmapped per-queue array.
type ioDesc struct {
	opFlags     uint32
	nrSectors   uint32
	startSector uint64
	addr        uint64
}

func decodeIODesc(b []byte) ioDesc {
	return ioDesc{
		opFlags:     binary.LittleEndian.Uint32(b[0:]),
		nrSectors:   binary.LittleEndian.Uint32(b[4:]),
		startSector: binary.LittleEndian.Uint64(b[8:]),
		addr:        binary.LittleEndian.Uint64(b[16:]),
	}
}

func (d ioDesc) op() uint8     { return uint8(d.opFlags & 0xff) }
func (d ioDesc) flags() uint32 { return d.opFlags >> 8 << 8 }

// ioCmd is struct ublksrv_io_cmd, the payload of FETCH_REQ and
// COMMIT_AND_FETCH_REQ.
type ioCmd struct {
	qid    uint16
	tag    uint16
	result int32
	addr   uint64
}

func (c ioCmd) encode(b []byte) {
	binary.LittleEndian.PutUint16(b[0:], c.qid)
	binary.LittleEndian.PutUint16(b[2:], c.tag)
	binary.LittleEndian.PutUint32(b[4:], uint32(c.result))
	binary.LittleEndian.PutUint64(b[8:], c.addr)
}

// descArrayOffset is the mmap offset of queue q's descriptor array on
// /dev/ublkcN; descArraySize the length the driver insists on.
func descArrayOffset(q int, pageSize int) int64 {
	return cmdBufOffset + int64(q)*int64(roundUp(maxQueueDepth*ioDescSize, pageSize))
}

func descArraySize(depth int, pageSize int) int { return roundUp(depth*ioDescSize, pageSize) }

func roundUp(n, to int) int { return (n + to - 1) / to * to }
