package bootsim

import (
	"net/netip"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
)

// TestFirewallRules: the verdicts of nftables_chain_config.go's ingress
// chain for new TCP connections.
func TestFirewallRules(t *testing.T) {
	rule := `
---
apiVersion: v1alpha1
kind: NetworkRuleConfig
name: api
portSelector:
  ports: [50000, 51000-51010]
  protocol: tcp
ingress:
  - subnet: 10.0.0.0/8
    except: 10.9.0.0/16
`
	own := netip.MustParseAddr("192.168.1.10")

	for _, tc := range []struct {
		name, docs string
		src        string
		port       uint16
		want       bool
	}{
		{"accept, no rules", "", "203.0.113.1", 50000, true},
		{"block, no rules", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: block", "203.0.113.1", 50000, false},
		{"block, own address", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: block", "192.168.1.10", 50000, true},
		{"block, loopback", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: block", "127.0.0.1", 50000, true},
		{"block, rule subnet", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: block" + rule, "10.1.2.3", 50000, true},
		{"block, rule range", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: block" + rule, "10.1.2.3", 51005, true},
		{"block, rule except", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: block" + rule, "10.9.2.3", 50000, false},
		{"block, other port", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: block" + rule, "10.1.2.3", 50001, false},
		{"accept, rule drops others", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: accept" + rule, "203.0.113.1", 50000, false},
		{"accept, rule lets subnet", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: accept" + rule, "10.1.2.3", 50000, true},
		{"accept, other port", "kind: NetworkDefaultActionConfig\napiVersion: v1alpha1\ningress: accept" + rule, "203.0.113.1", 50001, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var fw *firewall

			if tc.docs == "" {
				fw = firewallOf(nil, own)
			} else {
				cfg, err := configloader.NewFromBytes([]byte(tc.docs))
				if err != nil {
					t.Fatal(err)
				}

				fw = firewallOf(cfg, own, netip.MustParseAddr("127.0.0.1"))
			}

			if got := fw.allows(netip.MustParseAddr(tc.src), tc.port); got != tc.want {
				t.Fatalf("allows(%s, %d) = %v", tc.src, tc.port, got)
			}
		})
	}
}
