// Package hostapi holds the wire types of the host API (hostapi.proto): a
// machine of sovra's pool reports what it runs and its hardware, and receives
// its machine configuration or the instruction to wipe itself. Regenerate with
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
//	go generate ./internal/hostapi
package hostapi

//go:generate protoc --proto_path=. --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative hostapi.proto
