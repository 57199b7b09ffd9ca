package api

// The wire contract of image export and import, served by the volume's
// primary under /v1/server/volumes/{name}/ (the master never carries
// image bytes).

// ImageContentType is the media type of an image stream.
const ImageContentType = "application/x-blockd-image"

// HeaderImageEstimate is the export reply header giving the expected size
// of the image stream in bytes (for a progress bar; not a promise).
const HeaderImageEstimate = "X-Blockd-Image-Estimate"

// Image error codes (the status travels with the error).
const (
	// CodeBadImage (400): the stream is not a valid image (truncated,
	// corrupted, another version); the volume was not changed.
	CodeBadImage = "bad_image"
	// CodeImageConflict (409): a valid image that does not fit the volume
	// (not empty, wrong base, changed since the base, already imported).
	CodeImageConflict = "image_conflict"
	// CodeNoSpace (507): the server ran out of space (staging an import).
	CodeNoSpace = "no_space"
	// CodeBusy (409): another import of the volume is running.
	CodeBusy = "busy"
)

// ImportResult is the reply to a successful import.
type ImportResult struct {
	Volume string `json:"volume"`
	// Kind is "full" or "diff".
	Kind string `json:"kind"`
	// ImageBytes is the size of the image stream received.
	ImageBytes  int64  `json:"image_bytes"`
	DataBytes   int64  `json:"data_bytes"`
	ZeroBytes   int64  `json:"zero_bytes"`
	DataRecords int64  `json:"data_records"`
	ZeroRecords int64  `json:"zero_records"`
	Digest      string `json:"digest"`
	// Snapshot is the snapshot the import created from the image's source
	// snapshot (name and UUID as in the image), "" for an image of a live
	// volume.
	Snapshot     string `json:"snapshot,omitempty"`
	SnapshotUUID string `json:"snapshot_uuid,omitempty"`
	Forced       bool   `json:"forced,omitempty"`
}
