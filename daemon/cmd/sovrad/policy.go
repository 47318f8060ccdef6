package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/datadir"
)

const (
	// exitNotReference: the node cannot be a reference (it has not
	// attested, its last attestation did not pass, or it is quarantined).
	exitNotReference = 3
	// policyTimeout bounds reading the node from the API.
	policyTimeout = 30 * time.Second
)

// policyUsage explains the policy command; the flags follow it.
const policyUsage = `usage: sovrad policy capture --from-node NAME [flags]

Writes to stdout, as YAML, an AttestationPolicy that requires the PCR values
and claims of node NAME's last passing attestation (its SovraNode's
status.pcrs and status.claims), so that a known-good machine becomes the
reference for machines like it. Review it, apply it in Warn mode, watch the
nodes' warnings (kubectl get snode -o yaml: status.warnings), then capture
again with --mode Enforce and apply that:

  sovrad policy capture --from-node ek-0123... --selector sovra.dev/cluster=prod > policy.yaml
  kubectl apply -f policy.yaml

Claims that differ on every boot (nodekey.sha256, boot.id, boot.started) are
never taken. Notes on what was left out go to stderr.

Exit codes: 0 written; 1 the node could not be read; 2 bad flags; 3 the node
cannot be a reference (it has not attested, its last attestation did not
pass, or it is quarantined).

Flags:
`

// policyCommand runs "sovrad policy ..." and returns the exit code.
func policyCommand(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("sovrad policy capture", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		node, name, mode, selector, kubeconfig, dataDir string
		claims                                          []string
		pcrs                                            []int
	)
	fs.StringVar(&node, "from-node", "", "the SovraNode to take as the reference (required)")
	fs.StringVar(&name, "name", "", `the policy's name (default "captured-" and the node's name)`)
	fs.StringVar(&mode, "mode", string(v1alpha1.ModeWarn), "mode of every rule: Warn (record the finding, pass) or Enforce (fail the attestation)")
	fs.StringVar(&selector, "selector", "", "label selector of the nodes the policy judges, as kubectl takes it, e.g. sovra.dev/cluster=prod (default: every node)")
	fs.StringSliceVar(&claims, "claims", attestation.DefaultCaptureClaims, "claims to require: names, or patterns such as lsm.* (repeat or comma-separate)")
	fs.IntSliceVar(&pcrs, "pcrs", attestation.PolicyPCRs, "PCRs to require, of those the agent quotes")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig to read the node with (default: $KUBECONFIG, else the data directory's admin.kubeconfig)")
	fs.StringVar(&dataDir, "data-dir", defaultDataDir(), "sovrad's data directory, for its admin.kubeconfig")
	fs.Usage = func() {
		fmt.Fprint(stderr, policyUsage)
		fs.PrintDefaults()
	}
	switch {
	case len(args) == 1 && (args[0] == "-h" || args[0] == "--help"):
		fs.Usage()
		return exitOK
	case len(args) == 0 || args[0] != "capture":
		fs.Usage()
		return exitUsage
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	var bad []error
	if node == "" {
		bad = append(bad, errors.New("--from-node is required"))
	}
	if fs.NArg() > 0 {
		bad = append(bad, fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	sel, err := attestation.ParseNodeSelector(selector)
	if err != nil {
		bad = append(bad, fmt.Errorf("--selector: %w", err))
	}
	opts := attestation.CaptureOptions{Name: name, Mode: v1alpha1.Mode(mode), Selector: sel, Claims: claims, PCRs: pcrs}
	if !fs.Changed("pcrs") {
		opts.PCRs = nil // every quoted PCR the node reported
	}
	if err := opts.Validate(); err != nil {
		bad = append(bad, err)
	}
	if err := errors.Join(bad...); err != nil {
		printErrors(stderr, "sovrad policy capture: bad arguments", err)
		return exitUsage
	}

	rec, err := readNode(kubeconfigPath(kubeconfig, dataDir), node)
	if err != nil {
		fmt.Fprintf(stderr, "sovrad policy capture: %v\n", err)
		return exitFailed
	}
	p, notes, err := attestation.CapturePolicy(rec, opts)
	if errors.Is(err, attestation.ErrNotReference) {
		fmt.Fprintf(stderr, "sovrad policy capture: refused: %v\n", err)
		return exitNotReference
	}
	if err != nil {
		fmt.Fprintf(stderr, "sovrad policy capture: %v\n", err)
		return exitUsage
	}
	out, err := policyYAML(p, rec)
	if err != nil {
		fmt.Fprintf(stderr, "sovrad policy capture: %v\n", err)
		return exitFailed
	}
	for _, n := range notes {
		fmt.Fprintf(stderr, "note: %s\n", n)
	}
	if _, err := stdout.Write(out); err != nil {
		fmt.Fprintf(stderr, "sovrad policy capture: writing the policy: %v\n", err)
		return exitFailed
	}
	return exitOK
}

// defaultDataDir is SOVRA_DATA_DIR, else sovrad's default.
func defaultDataDir() string {
	if d := os.Getenv(config.EnvName("data-dir")); d != "" {
		return d
	}
	return config.New().DataDir
}

// kubeconfigPath is the kubeconfig to use: the flag's, else $KUBECONFIG
// (empty: client-go reads it), else the data directory's admin kubeconfig.
func kubeconfigPath(flag, dataDir string) string {
	switch {
	case flag != "":
		return flag
	case os.Getenv(clientcmd.RecommendedConfigPathEnvVar) != "":
		return ""
	}
	return filepath.Join(dataDir, datadir.AdminKubeconfig)
}

// readNode reads SovraNode name with the kubeconfig at path (empty: the
// default loading rules, which honour $KUBECONFIG).
func readNode(path, name string) (*v1alpha1.SovraNode, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, nil).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("loading the kubeconfig: %w", err)
	}
	cfg.ContentType = runtime.ContentTypeJSON
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("creating an API client: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), policyTimeout)
	defer cancel()
	var n v1alpha1.SovraNode
	err = c.Get(ctx, client.ObjectKey{Name: name}, &n)
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("no SovraNode %s (kubectl get sovranodes lists them)", name)
	}
	if err != nil {
		return nil, fmt.Errorf("reading SovraNode %s: %w", name, err)
	}
	return &n, nil
}

// policyYAML is p as YAML for kubectl apply, after a comment that says
// where it came from and what to do with it.
func policyYAML(p *v1alpha1.AttestationPolicy, from *v1alpha1.SovraNode) ([]byte, error) {
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(p)
	if err != nil {
		return nil, fmt.Errorf("encoding the policy: %w", err)
	}
	unstructured.RemoveNestedField(obj, "metadata", "creationTimestamp")
	body, err := yaml.Marshal(obj)
	if err != nil {
		return nil, fmt.Errorf("encoding the policy: %w", err)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Captured by sovrad policy capture from node %s", from.Name)
	if from.Spec.Hostname != "" {
		fmt.Fprintf(&b, " (%s)", from.Spec.Hostname)
	}
	if t := from.Status.LastAttestationTime; t != nil {
		fmt.Fprintf(&b, ", attested %s", t.UTC().Format(time.RFC3339))
	}
	mode := v1alpha1.ModeWarn
	if len(p.Spec.PCRs) > 0 {
		mode = p.Spec.PCRs[0].Mode
	}
	fmt.Fprintf(&b, ".\n# Mode %s. Review every rule before you apply it; apply it in Warn mode first.\n", mode)
	b.WriteString(strings.TrimPrefix(string(body), "\n"))
	return b.Bytes(), nil
}
