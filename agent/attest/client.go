package attest

import (
	"google.golang.org/grpc"

	"github.com/sovra-dev/sovra/internal/nodeapi"
)

// NewClient wraps a connection in the node API client. The agent's
// connection is a *daemonconn.Conn (agent/daemonconn): TLS 1.3 to the
// configured daemon name, the node credential when there is one, and a
// deadline on every call.
func NewClient(conn grpc.ClientConnInterface) nodeapi.NodeServiceClient {
	return nodeapi.NewNodeServiceClient(conn)
}
