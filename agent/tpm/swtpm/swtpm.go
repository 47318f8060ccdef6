// Package swtpm reaches a software TPM (swtpm in socket mode) over TCP. The
// data channel carries raw TPM 2.0 commands; swtpm must run with
// --flags not-need-init,startup-clear since this package never uses the
// control channel.
package swtpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

const (
	// headerLen is a TPM response header: tag (2), size (4), code (4).
	headerLen = 10
	// maxResponse bounds a response; TPM 2.0 buffers are at most a few KiB.
	maxResponse = 1 << 16
	// DefaultDialTimeout applies when TCP.DialTimeout is zero.
	DefaultDialTimeout = 5 * time.Second
)

// TCP dials swtpm's data channel.
type TCP struct {
	// Addr is host:port of the --server socket.
	Addr string
	// DialTimeout bounds the dial; zero means DefaultDialTimeout.
	DialTimeout time.Duration
}

// Open dials Addr and returns a channel that reads whole responses.
func (s TCP) Open() (io.ReadWriteCloser, error) {
	timeout := s.DialTimeout
	if timeout == 0 {
		timeout = DefaultDialTimeout
	}
	c, err := net.DialTimeout("tcp", s.Addr, timeout)
	if err != nil {
		return nil, fmt.Errorf("dialing swtpm: %w", err)
	}
	return &conn{Conn: c}, nil
}

// conn frames responses: go-tpm reads each response with one Read, which
// over TCP may return part of it, so Read fills a whole response first.
type conn struct {
	net.Conn
	// pending holds the rest of the last response; only the TPM's single
	// user goroutine touches it.
	pending []byte
}

func (c *conn) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		hdr := make([]byte, headerLen)
		if _, err := io.ReadFull(c.Conn, hdr); err != nil {
			return 0, fmt.Errorf("reading TPM response header: %w", err)
		}
		size := binary.BigEndian.Uint32(hdr[2:6])
		if size < headerLen || size > maxResponse {
			return 0, errors.New("reading TPM response: bad size in header")
		}
		resp := make([]byte, size)
		copy(resp, hdr)
		if _, err := io.ReadFull(c.Conn, resp[headerLen:]); err != nil {
			return 0, fmt.Errorf("reading TPM response body: %w", err)
		}
		c.pending = resp
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}
