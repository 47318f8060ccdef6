// Package talosadmin is sovrad's client of a worker's Talos API: with the
// talosconfig of the worker's cluster (the <cluster>-talosconfig Secret the
// Talos bootstrap provider keeps, whose os:admin certificate is of the
// cluster's Talos CA, the only CA a worker's apid accepts), it applies a new
// configuration generation and resets a released worker, the two calls that
// need os:admin there (Talos's machined.go rules) and that a worker's own
// agent, which holds an os:reader certificate only, cannot make.
//
// It is the Talos machinery client, as the Talos control-plane provider
// reaches control-plane nodes from sovrad. The addresses are what the host
// reported, so before it calls, it reads the system UUID the node at an
// address publishes (hardware.SystemInformation: the SMBIOS UUID, or META's
// override, as Talos's controllers/hardware/system.go sets it; the UUID the
// node's KMS calls name) and calls only a node that is the host: a host that reports another node's address cannot have
// that node reset or given its configuration. Its errors never contain the
// configuration or key material: a refused call is reported by its gRPC
// code, a connection failure by its cause.
package talosadmin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/cosi-project/runtime/pkg/safe"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultTimeout bounds one call.
const DefaultTimeout = 30 * time.Second

// The system partitions a reset wipes, as the agent's reset does.
const (
	statePartition     = "STATE"
	ephemeralPartition = "EPHEMERAL"
)

// Node is the host sovrad calls: its SMBIOS UUID and the addresses it
// reported.
type Node struct {
	UUID      string
	Addresses []string
}

// Client calls a node's Talos API.
type Client struct {
	// Port is apid's port; zero means 50000.
	Port int
	// Timeout bounds one call; zero means DefaultTimeout.
	Timeout time.Duration
}

// ApplyConfiguration hands config to the Talos of node, which stores it
// and reboots into it.
func (c Client) ApplyConfiguration(ctx context.Context, talosconfig []byte, node Node, config []byte) error {
	return c.call(ctx, talosconfig, node, "ApplyConfiguration", func(ctx context.Context, cl *talosclient.Client) error {
		_, err := cl.ApplyConfiguration(ctx, &machine.ApplyConfigurationRequest{Data: config, Mode: machine.ApplyConfigurationRequest_REBOOT})
		return err
	})
}

// Reset makes the Talos of node wipe STATE and EPHEMERAL on its system disk
// and reboot, without leaving etcd first (a worker has no etcd member; its
// cluster has let it go).
func (c Client) Reset(ctx context.Context, talosconfig []byte, node Node) error {
	return c.call(ctx, talosconfig, node, "Reset", func(ctx context.Context, cl *talosclient.Client) error {
		return cl.ResetGeneric(ctx, &machine.ResetRequest{
			Graceful: false,
			Reboot:   true,
			Mode:     machine.ResetRequest_SYSTEM_DISK,
			SystemPartitionsToWipe: []*machine.ResetPartitionSpec{
				{Label: statePartition, Wipe: true},
				{Label: ephemeralPartition, Wipe: true},
			},
		})
	})
}

// call makes f on the first of node's addresses whose Talos is node.
func (c Client) call(ctx context.Context, talosconfig []byte, node Node, method string, f func(context.Context, *talosclient.Client) error) error {
	if len(node.Addresses) == 0 {
		return fmt.Errorf("calling Talos %s: the node has no address", method)
	}
	cfg, err := clientconfig.FromBytes(talosconfig)
	if err != nil {
		return fmt.Errorf("calling Talos %s: the cluster's talosconfig does not load", method)
	}
	port := c.Port
	if port == 0 {
		port = constants.ApidPort
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var errs []error
	for _, a := range node.Addresses {
		err := c.callAt(ctx, cfg, net.JoinHostPort(a, strconv.Itoa(port)), node.UUID, f)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", a, err))
		if !errors.Is(err, errNotThisNode) && !errors.Is(err, errUnreachable) {
			break // the node answered and refused: another address reaches the same node
		}
	}
	return fmt.Errorf("calling Talos %s: %w", method, errors.Join(errs...))
}

var (
	errNotThisNode = errors.New("the node there is not this host")
	errUnreachable = errors.New("unreachable")
)

// callAt makes f on the node at endpoint if its SMBIOS UUID is uuid.
func (c Client) callAt(ctx context.Context, cfg *clientconfig.Config, endpoint, uuid string, f func(context.Context, *talosclient.Client) error) error {
	cl, err := talosclient.New(ctx, talosclient.WithConfig(cfg), talosclient.WithEndpoints(endpoint))
	if err != nil {
		return fmt.Errorf("%w: %w", errUnreachable, err)
	}
	defer cl.Close() //nolint:errcheck
	si, err := safe.StateGetByID[*hardware.SystemInformation](ctx, cl.COSI, hardware.SystemInformationID)
	if err != nil {
		return fmt.Errorf("%w: reading its system information: %w", errUnreachable, describe(err))
	}
	if got := si.TypedSpec().UUID; !strings.EqualFold(got, uuid) {
		return fmt.Errorf("%w: it is machine %s", errNotThisNode, got)
	}
	if err := f(ctx, cl); err != nil {
		return describe(err)
	}
	return nil
}

// describe keeps what an error says about the call: its gRPC code, and the
// message only where it is about the connection (machined's answers to a
// configuration may quote it).
func describe(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.DeadlineExceeded) {
			return errors.New("timed out")
		}
		return errors.New("the call failed")
	}
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Unauthenticated, codes.PermissionDenied:
		return fmt.Errorf("%s: %s", st.Code(), st.Message())
	default:
		return errors.New(st.Code().String())
	}
}
