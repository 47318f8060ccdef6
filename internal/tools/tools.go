//go:build tools

// Package tools pins what tests build but no code imports: the upstream
// reference KMS server (kms-client/cmd/kms-server), which the boot-storm
// benchmark in tests/kms builds and runs beside sovrad. Importing its package
// keeps its dependencies in go.sum.
package tools

import (
	_ "github.com/siderolabs/kms-client/pkg/server"
)
