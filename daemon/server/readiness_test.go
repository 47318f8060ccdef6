package server

import (
	"net/url"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/daemon/config"
)

func TestReadinessChecksThatDoNotApplyPass(t *testing.T) {
	cfg := config.New()
	cfg.NodeAPI.Listen = ""
	rd := newReadiness(cfg)
	for _, c := range rd.checks() {
		if err := c.Check(nil); err != nil {
			t.Errorf("%s fails with no node API and no KMS: %v", c.Name(), err)
		}
	}
}

func TestReadinessChecksWaitUntilOpened(t *testing.T) {
	cfg := config.New()
	cfg.KMS.MasterKeyFile = "/nonexistent/master.key"
	rd := newReadiness(cfg)
	var names []string
	for _, c := range rd.checks() {
		names = append(names, c.Name())
		if c.Check(nil) == nil {
			t.Errorf("%s passes before anything started", c.Name())
		}
	}
	if got := strings.Join(names, ","); got != "sovra-node-api,sovra-kms,sovra-crds" {
		t.Fatalf("checks %s", got)
	}
	rd.nodeAPI.Open()
	rd.crds.Open()
	if rd.nodeAPI.Check(nil) != nil || rd.crds.Check(nil) != nil {
		t.Fatal("an opened gate still fails")
	}
	if rd.kms.Check(nil) == nil {
		t.Fatal("the KMS check passes without a KMS")
	}
}

func TestAPIReadyzExcludesSovraChecks(t *testing.T) {
	u, err := url.Parse(apiReadyz())
	if err != nil {
		t.Fatal(err)
	}
	if u.Path != "/readyz" || strings.Join(u.Query()["exclude"], ",") != "sovra-node-api,sovra-kms,sovra-crds" {
		t.Fatalf("%s", apiReadyz())
	}
}
