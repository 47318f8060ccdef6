// Package logging is sovrad's policy for the logs of the libraries it runs
// in-process (the API server's klog, Cluster API's controller-runtime): a
// start at --log-level info shows sovrad's own lines and every library's
// warnings and errors, not the hundreds of info lines the libraries write
// while they start, which would bury the warnings that matter.
package logging

import (
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Library returns log for a library's logs: its info lines are dropped
// unless log is at debug.
func Library(log *zap.Logger) *zap.Logger {
	if log.Core().Enabled(zapcore.DebugLevel) {
		return log
	}
	return log.WithOptions(zap.IncreaseLevel(zapcore.WarnLevel))
}
