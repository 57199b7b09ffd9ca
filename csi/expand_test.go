package csi

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/blockd/blockd/nbd/kernel"
)

// TestExpandRenegotiates checks the seam NodeExpandVolume stands on: NBD
// fixes an export's size per connection, so after ControllerExpandVolume
// the volume's server must cut its NBD connections (a kernel keeper then
// reconnects and sees the new size). A connection negotiated before the
// expand is closed by the server; a new one negotiates the new size.
func TestExpandRenegotiates(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real blockd processes; skipped in -short mode")
	}
	c := newCluster(t, 1)
	ep, _ := startDriver(t, []string{c.master}, ModeController)
	conn, err := grpc.NewClient(ep, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cc := csi.NewControllerClient(conn)
	ctx := context.Background()
	if _, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "grow", Parameters: map[string]string{ParamWALSize: "4194304"},
		VolumeCapabilities: []*csi.VolumeCapability{capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "", true)},
		CapacityRange:      &csi.CapacityRange{RequiredBytes: 8 << 20}}); err != nil {
		t.Fatal(err)
	}
	var nc net.Conn
	var exp kernel.Export
	c.waitFor("the volume served over NBD", 60*time.Second, func() error {
		p, err := c.client.PrimaryOf(ctx, "grow")
		if err != nil {
			return err
		}
		if p.NBDAddr == "" {
			return errors.New("no NBD address yet")
		}
		x, err := net.Dial("tcp", p.NBDAddr)
		if err != nil {
			return err
		}
		e, err := kernel.Negotiate(x, "grow", time.Now().Add(5*time.Second))
		if err != nil {
			x.Close()
			return err
		}
		nc, exp = x, e
		return nil
	})
	defer nc.Close()
	if exp.Size != 8<<20 {
		t.Fatalf("negotiated %d bytes, want %d", exp.Size, 8<<20)
	}
	if _, err := cc.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "grow",
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}}); err != nil {
		t.Fatal(err)
	}
	// The server closes the old connection once it has grown the volume.
	_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	var b [1]byte
	_, err = nc.Read(b[:])
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the NBD connection negotiated before the expand is still open 30s later: its client never learns the new size")
	}
	t.Logf("old connection ended: %v", err)
	p, err := c.client.PrimaryOf(ctx, "grow")
	if err != nil {
		t.Fatal(err)
	}
	x, err := net.Dial("tcp", p.NBDAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	e, err := kernel.Negotiate(x, "grow", time.Now().Add(5*time.Second))
	if err != nil || e.Size != 16<<20 {
		t.Fatalf("renegotiated %d bytes (%v), want %d", e.Size, err, 16<<20)
	}
	if info, err := c.client.VolumeInfo(ctx, "grow"); err != nil || info.SizeBytes != 16<<20 {
		t.Fatalf("master: %+v %v", info, err)
	}
}
