// Package talosadmin is sovrad's client of a worker's Talos API: with the
// talosconfig of the worker's cluster (the <cluster>-talosconfig Secret the
// Talos bootstrap provider keeps, whose os:admin certificate is of the
// cluster's Talos CA, the only CA a worker's apid accepts), it applies a new
// configuration generation and resets a released worker, the two calls that
// need os:admin there (Talos's machined.go rules) and that a worker's own
// agent, which holds an os:reader certificate only, cannot make.
//
// It is the Talos machinery client, as the Talos control-plane provider
// reaches control-plane nodes from sovrad. Its errors never contain the
// configuration or key material: a refused call is reported by its gRPC
// code, a connection failure by its cause.
package talosadmin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"github.com/siderolabs/talos/pkg/machinery/constants"
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

// Client calls a node's Talos API.
type Client struct {
	// Port is apid's port; zero means 50000.
	Port int
	// Timeout bounds one call; zero means DefaultTimeout.
	Timeout time.Duration
}

// ApplyConfiguration hands config to the Talos of the node at addresses,
// which stores it and reboots into it.
func (c Client) ApplyConfiguration(ctx context.Context, talosconfig []byte, addresses []string, config []byte) error {
	return c.call(ctx, talosconfig, addresses, "ApplyConfiguration", func(ctx context.Context, cl *talosclient.Client) error {
		_, err := cl.ApplyConfiguration(ctx, &machine.ApplyConfigurationRequest{Data: config, Mode: machine.ApplyConfigurationRequest_REBOOT})
		return err
	})
}

// Reset makes the Talos of the node at addresses wipe STATE and EPHEMERAL
// on its system disk and reboot, without leaving etcd first (a worker has
// no etcd member; its cluster has let it go).
func (c Client) Reset(ctx context.Context, talosconfig []byte, addresses []string) error {
	return c.call(ctx, talosconfig, addresses, "Reset", func(ctx context.Context, cl *talosclient.Client) error {
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

func (c Client) call(ctx context.Context, talosconfig []byte, addresses []string, method string, f func(context.Context, *talosclient.Client) error) error {
	if len(addresses) == 0 {
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
	endpoints := make([]string, 0, len(addresses))
	for _, a := range addresses {
		endpoints = append(endpoints, net.JoinHostPort(a, strconv.Itoa(port)))
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cl, err := talosclient.New(ctx, talosclient.WithConfig(cfg), talosclient.WithEndpoints(endpoints...))
	if err != nil {
		return fmt.Errorf("connecting to the Talos API of %v: %w", addresses, err)
	}
	defer cl.Close() //nolint:errcheck
	if err := f(ctx, cl); err != nil {
		return fmt.Errorf("calling Talos %s on %v: %w", method, addresses, describe(err))
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
