package keyservice

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are a node's Prometheus metrics: releases, denials by reason,
// attestations by mode and result, request latency, and etcd's health as
// this node sees it.
type Metrics struct {
	reg          *prometheus.Registry
	releases     prometheus.Counter
	denials      *prometheus.CounterVec
	attestations *prometheus.CounterVec
	latency      *prometheus.HistogramVec
	etcdHealthy  prometheus.Gauge
	etcdFailures prometheus.Counter
}

func newMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		releases: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vtpm_keyservice_releases_total", Help: "Data keys released to attested hosts.",
		}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vtpm_keyservice_denials_total", Help: "Requests of hosts refused, by reason.",
		}, []string{"reason"}),
		attestations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vtpm_keyservice_attestations_total", Help: "Attestations, by mode and result (pass, fail).",
		}, []string{"mode", "result"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "vtpm_keyservice_request_duration_seconds", Help: "Time to answer an API request, by method.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"method"}),
		etcdHealthy: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vtpm_keyservice_etcd_healthy", Help: "1 when this node's last etcd request succeeded, 0 when etcd was unavailable.",
		}),
		etcdFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vtpm_keyservice_etcd_unavailable_total", Help: "Requests that failed because etcd had no quorum or no reachable member.",
		}),
	}
	m.reg.MustRegister(m.releases, m.denials, m.attestations, m.latency, m.etcdHealthy, m.etcdFailures,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

func (m *Metrics) release(time.Duration) { m.releases.Inc() }

func (m *Metrics) denial(reason string) { m.denials.WithLabelValues(reason).Inc() }

func (m *Metrics) attestation(mode, result string) {
	m.attestations.WithLabelValues(mode, result).Inc()
}

func (m *Metrics) observe(method string, d time.Duration) {
	m.latency.WithLabelValues(method).Observe(d.Seconds())
}

func (m *Metrics) etcd(ok bool) {
	if ok {
		m.etcdHealthy.Set(1)
		return
	}
	m.etcdHealthy.Set(0)
	m.etcdFailures.Inc()
}

// Handler serves the metrics in Prometheus' text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}
