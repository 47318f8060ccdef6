//go:build tools

// Package tools pins the modules of the dependency line that no code imports yet.
package tools

import (
	_ "github.com/cosi-project/runtime/pkg/state"
	_ "github.com/google/go-attestation/attest"
	_ "github.com/google/go-tpm-tools/simulator"
	_ "github.com/google/go-tpm/tpm2"
	_ "github.com/hashicorp/go-retryablehttp"
	_ "github.com/k3s-io/kine/pkg/endpoint"
	_ "github.com/siderolabs/cluster-api-bootstrap-provider-talos/controllers"
	_ "github.com/siderolabs/cluster-api-control-plane-provider-talos/controllers"
	_ "github.com/siderolabs/go-blockdevice/v2/encryption/luks"
	_ "github.com/siderolabs/kms-client/api/kms"
	_ "github.com/siderolabs/kms-client/pkg/server"
	_ "github.com/siderolabs/talos/pkg/machinery/client"
	_ "github.com/siderolabs/talos/pkg/machinery/config/configloader"
	_ "github.com/spf13/pflag"
	_ "go.uber.org/zap"
	_ "google.golang.org/grpc"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/pkg/controlplane/apiserver"
	_ "sigs.k8s.io/cluster-api/controllers"
	_ "sigs.k8s.io/controller-runtime"
)
