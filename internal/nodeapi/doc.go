// Package nodeapi holds the wire types and gRPC stubs of the node API that the
// sovra agent uses to enroll its TPM with the daemon and to attest each boot
// (NodeService), and, with the node credential an attestation earns, to list
// the attested members of its cluster and take the cluster's bootstrap lease
// (ClusterService).
//
// The Go code is generated from nodeapi.proto by protoc (Debian
// protobuf-compiler) with the plugins at the versions go.mod pins:
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
//	go generate ./internal/nodeapi
package nodeapi

//go:generate protoc --proto_path=. --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative nodeapi.proto
