package hostd

import (
	"context"
	"net"
	"net/http"

	"vtpm/api/vtpm/host/v1/hostv1connect"
)

// DialFleet returns a client of the local API's FleetService at socket
// (default APISocketPath()), as DialLocal does for the others.
func DialFleet(socket string) hostv1connect.FleetServiceClient {
	if socket == "" {
		socket = APISocketPath()
	}
	tr := &http.Transport{Protocols: h2c(), DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return dialLocal(ctx, socket)
	}}
	tr.Protocols.SetHTTP1(false)
	return hostv1connect.NewFleetServiceClient(&http.Client{Transport: tr}, "http://localhost")
}
