// Command gen extracts the CustomResourceDefinitions and webhook
// registrations of Cluster API core and the Talos providers from the module
// cache, at the versions go.mod pins, into the folder package crds embeds.
//
// It builds each provider's config/default kustomization with kustomize's own
// engine (krusty), so the CRDs carry exactly the labels, conversion settings
// and names a clusterctl install gives them, and keeps the
// CustomResourceDefinitions and the Mutating/ValidatingWebhookConfigurations.
// Nothing is copied by hand: a new pin in go.mod and `go generate` refresh it.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// providers are the modules whose manifests sovrad installs, by the folder
// name package crds reads them from.
var providers = []struct{ name, module string }{
	{"cluster-api", "sigs.k8s.io/cluster-api"},
	{"bootstrap-talos", "github.com/siderolabs/cluster-api-bootstrap-provider-talos"},
	{"control-plane-talos", "github.com/siderolabs/cluster-api-control-plane-provider-talos"},
}

// keptKinds are the kinds written out; the rest of a provider's deployment
// (Deployment, Service, namespaced RBAC, cert-manager objects) is replaced by
// sovrad. The ClusterRoles are the rights each provider's manager needs: sovrad
// grants them to the identity it runs Cluster API as (package identity).
var keptKinds = map[string]string{
	"CustomResourceDefinition":       crdsFile,
	"MutatingWebhookConfiguration":   webhooksFile,
	"ValidatingWebhookConfiguration": webhooksFile,
	"ClusterRole":                    rbacFile,
}

// Output file names, as package crds reads them.
const (
	crdsFile     = "crds.yaml"
	webhooksFile = "webhooks.yaml"
	rbacFile     = "rbac.yaml"
)

func main() {
	out := flag.String("out", "generated", "folder to write into")
	flag.Parse()
	if err := run(*out); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func run(out string) error {
	for _, p := range providers {
		dir, version, err := moduleDir(p.module)
		if err != nil {
			return err
		}
		files, err := build(filepath.Join(dir, "config", "default"))
		if err != nil {
			return fmt.Errorf("building %s@%s config/default: %w", p.module, version, err)
		}
		if len(files[crdsFile]) == 0 {
			return fmt.Errorf("%s@%s config/default has no CustomResourceDefinition", p.module, version)
		}
		target := filepath.Join(out, p.name)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return err
		}
		files["module"] = []byte(p.module + "@" + version + "\n")
		for name, data := range files {
			if err := os.WriteFile(filepath.Join(target, name), data, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// moduleDir asks the go command where the pinned module lives, downloading
// it first on a fresh machine.
func moduleDir(module string) (dir, version string, err error) {
	for attempt := 0; ; attempt++ {
		cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}} {{.Version}}", module)
		cmd.Stderr = os.Stderr
		b, err := cmd.Output()
		if err != nil {
			return "", "", fmt.Errorf("locating %s: %w", module, err)
		}
		if f := strings.Fields(string(b)); len(f) == 2 {
			return f[0], f[1], nil
		}
		if attempt > 0 {
			return "", "", fmt.Errorf("locating %s: not in the module cache after go mod download", module)
		}
		download := exec.Command("go", "mod", "download", module)
		download.Stdout, download.Stderr = os.Stderr, os.Stderr
		if err := download.Run(); err != nil {
			return "", "", fmt.Errorf("downloading %s: %w", module, err)
		}
	}
}

// build runs kustomize on dir and returns the kept objects, by output file.
func build(dir string) (map[string][]byte, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	// kustomize writes a warning to stderr for each deprecated field the
	// Talos providers' kustomizations still use (they build the same); its
	// errors are returned, so stderr is muted while it runs.
	stderr := os.Stderr
	if devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0); err == nil {
		os.Stderr = devNull
		defer devNull.Close()
	}
	resMap, err := k.Run(filesys.MakeFsOnDisk(), dir)
	os.Stderr = stderr
	if err != nil {
		return nil, err
	}
	files := map[string]*bytes.Buffer{}
	for _, r := range resMap.Resources() {
		name, ok := keptKinds[r.GetKind()]
		if !ok {
			continue
		}
		y, err := r.AsYAML()
		if err != nil {
			return nil, err
		}
		if files[name] == nil {
			files[name] = &bytes.Buffer{}
		}
		files[name].WriteString("---\n")
		files[name].Write(y)
	}
	outFiles := map[string][]byte{}
	for n, b := range files {
		outFiles[n] = b.Bytes()
	}
	return outFiles, nil
}
