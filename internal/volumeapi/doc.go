// Package volumeapi holds the wire types and gRPC stubs of the volume key
// API: the agent fetches the keys of the data volumes it encrypts itself
// over mutual TLS with its node credential.
//
// The Go code is generated from volumeapi.proto by protoc (Debian
// protobuf-compiler) with the plugins at the versions go.mod pins:
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
//	go generate ./internal/volumeapi
package volumeapi

//go:generate protoc --proto_path=. --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative volumeapi.proto
