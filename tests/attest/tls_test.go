package attest

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

// TestNodeAPIIsTLSOnly: a plaintext client of the built sovrad gets nowhere.
func TestNodeAPIIsTLSOnly(t *testing.T) {
	d := startDaemon(t, "--ek-trust-on-first-use")
	conn, err := grpc.NewClient(d.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = pb.NewNodeServiceClient(conn).GetNonce(ctx, &pb.NonceRequest{Node: "ek-x"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("plaintext call = %v, want Unavailable", err)
	}
}
