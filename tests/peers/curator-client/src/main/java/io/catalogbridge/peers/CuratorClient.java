package io.catalogbridge.peers;

import java.io.IOException;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.RetryNTimes;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;

/**
 * Curator's service discovery, as a Curator (or Spring Cloud Zookeeper) application uses it,
 * with Curator's default JSON serializer.
 *
 * <pre>
 * java -cp '&lt;dir&gt;/*' io.catalogbridge.peers.CuratorClient query &lt;connect&gt; &lt;base&gt; &lt;name&gt;
 *   prints ServiceDiscovery.queryForInstances(name) as one JSON array of "id address:port",
 *   sorted; fails when Curator cannot read an instance.
 * java -cp '&lt;dir&gt;/*' io.catalogbridge.peers.CuratorClient register &lt;connect&gt; &lt;base&gt; &lt;name&gt; &lt;address&gt; &lt;port&gt;
 *   registers one instance (ServiceDiscovery.registerService: an ephemeral node), prints
 *   "READY &lt;id&gt;", and keeps it registered until standard input closes.
 * </pre>
 */
public final class CuratorClient {
  private CuratorClient() {}

  public static void main(String[] args) throws Exception {
    boolean query = args.length == 4 && args[0].equals("query");
    boolean register = args.length == 6 && args[0].equals("register");
    if (!query && !register) {
      System.err.println(
          "usage: CuratorClient query <connect> <base path> <name>\n"
              + "       CuratorClient register <connect> <base path> <name> <address> <port>");
      System.exit(2);
    }
    try (CuratorFramework client =
        CuratorFrameworkFactory.newClient(args[1], 15_000, 5_000, new RetryNTimes(3, 500))) {
      client.start();
      if (!client.blockUntilConnected(15, TimeUnit.SECONDS)) {
        throw new IllegalStateException("no ZooKeeper connection to " + args[1]);
      }
      try (ServiceDiscovery<Void> discovery =
          ServiceDiscoveryBuilder.builder(Void.class).client(client).basePath(args[2]).build()) {
        discovery.start();
        if (query) {
          System.out.println(query(discovery, args[3]));
        } else {
          ServiceInstance<Void> instance =
              ServiceInstance.<Void>builder()
                  .name(args[3])
                  .address(args[4])
                  .port(Integer.parseInt(args[5]))
                  .build();
          discovery.registerService(instance);
          System.out.println("READY " + instance.getId());
          System.out.flush();
          waitForEndOfInput();
          discovery.unregisterService(instance);
        }
      }
    }
  }

  private static String query(ServiceDiscovery<Void> discovery, String name) throws Exception {
    Collection<ServiceInstance<Void>> instances = discovery.queryForInstances(name);
    List<String> out = new ArrayList<>();
    for (ServiceInstance<Void> i : instances) {
      out.add("\"" + i.getId() + " " + i.getAddress() + ":" + i.getPort() + "\"");
    }
    out.sort(null);
    return "[" + String.join(",", out) + "]";
  }

  private static void waitForEndOfInput() throws IOException {
    byte[] buf = new byte[256];
    while (System.in.read(buf) >= 0) {
      // keep the registration until the parent closes our standard input
    }
  }
}
