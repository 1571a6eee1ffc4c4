package instance

// IdleAfter is idleAfter, for the tests.
const IdleAfter = idleAfter
