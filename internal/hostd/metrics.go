package hostd

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
)

// Migration outcomes, the values of the outcome label.
const (
	MigrationSucceeded = "succeeded"
	MigrationFailed    = "failed"
	MigrationCanceled  = "canceled"
)

// Metrics are the host service's Prometheus metrics. The zero value is not
// usable; a Server makes its own (Server.Metrics).
type Metrics struct {
	reg         *prometheus.Registry
	migrations  *prometheus.CounterVec
	keyFailures *prometheus.CounterVec
}

// NewMetrics returns the metrics, reading the number of running vTPMs from
// running at each scrape.
func NewMetrics(running func() int) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vtpm", Subsystem: "host", Name: "migrations_total",
			Help: "VM migrations this host took part in, by role (source, destination) and outcome.",
		}, []string{"role", "outcome"}),
		keyFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "vtpm", Subsystem: "host", Name: "key_open_failures_total",
			Help: "Requests for a TPM's key that the host service refused or failed, by error kind.",
		}, []string{"kind"}),
	}
	// Every series exists from the start, at zero, so a rate is defined
	// before the first migration.
	for _, role := range []string{"source", "destination"} {
		for _, o := range []string{MigrationSucceeded, MigrationFailed, MigrationCanceled} {
			m.migrations.WithLabelValues(role, o)
		}
	}
	m.reg.MustRegister(m.migrations, m.keyFailures,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "vtpm", Subsystem: "host", Name: "running_vtpms",
			Help: "vTPM instances of this host's registered VMs that are running.",
		}, func() float64 { return float64(running()) }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Migration counts a migration this host took part in as role ("source"
// or "destination") with its outcome (MigrationSucceeded, …).
func (m *Metrics) Migration(role, outcome string) {
	m.migrations.WithLabelValues(role, outcome).Inc()
}

// KeyOpenFailure counts a key request refused or failed with err.
func (m *Metrics) KeyOpenFailure(err error) {
	kind := apierr.KindName(errdefs.KindOf(err))
	if kind == "" {
		kind = "other"
	}
	m.keyFailures.WithLabelValues(kind).Inc()
}

// Handler serves the metrics in Prometheus' exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}
