package hostd

import "vtpm/api/vtpm/host/v1/hostv1connect"

// DialFleet returns a client of the local API's FleetService at socket
// (default APISocketPath()), on DialLocal's connection.
func DialFleet(socket string) hostv1connect.FleetServiceClient {
	c := DialLocal(socket)
	return hostv1connect.NewFleetServiceClient(c.HTTP, c.Base)
}
