package hostd

import (
	"log"
	"log/slog"
)

// errorLog sends net/http's own messages (a TLS handshake refused, a bad
// request) to the service's log as warnings: a refused peer is news.
func errorLog(l *slog.Logger) *log.Logger {
	return slog.NewLogLogger(l.Handler(), slog.LevelWarn)
}
