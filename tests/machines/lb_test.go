package machines

import (
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

// lbDialTimeout bounds the load balancer's connection to one backend.
const lbDialTimeout = 2 * time.Second

// loadBalancer is the operator's TCP load balancer in front of the control
// planes (images/example-cluster.yaml: "your control plane's VIP, DNS name
// or load balancer"): each connection goes to the first of its backends
// that accepts one on the same port. The operator's pool is the control
// planes' addresses, which the story sets once the hosts are claimed.
type loadBalancer struct {
	addr netip.Addr

	mu       sync.Mutex
	backends []netip.Addr
}

// newLoadBalancer takes address number host on the test's leg and balances
// each of ports there.
func (n *network) newLoadBalancer(t testing.TB, host int, ports ...int) *loadBalancer {
	t.Helper()

	lb := &loadBalancer{addr: n.addr(host)}
	n.ip("addr", "add", lb.addr.String()+"/32", "dev", n.leg)

	for _, port := range ports {
		l, err := net.Listen("tcp", net.JoinHostPort(lb.addr.String(), strconv.Itoa(port)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() }) //nolint:errcheck

		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go lb.forward(c, port)
			}
		}()
	}

	return lb
}

// setBackends replaces the pool.
func (lb *loadBalancer) setBackends(addrs []netip.Addr) {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	lb.backends = slices.Clone(addrs)
}

// forward joins c to the first backend that accepts on port, or closes it.
func (lb *loadBalancer) forward(c net.Conn, port int) {
	defer c.Close() //nolint:errcheck

	lb.mu.Lock()
	backends := slices.Clone(lb.backends)
	lb.mu.Unlock()

	var b net.Conn
	for _, a := range backends {
		var err error
		if b, err = net.DialTimeout("tcp", net.JoinHostPort(a.String(), strconv.Itoa(port)), lbDialTimeout); err == nil {
			break
		}
	}
	if b == nil {
		return
	}
	defer b.Close() //nolint:errcheck

	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		io.Copy(dst, src) //nolint:errcheck // either side ending ends the connection
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite() //nolint:errcheck
		}
		done <- struct{}{}
	}
	go pipe(b, c)
	go pipe(c, b)
	<-done
	<-done
}
