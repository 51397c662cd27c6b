package io.catalogbridge.peers;

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
 * Reads a service the way a Curator (or Spring Cloud Zookeeper) client does: {@code
 * ServiceDiscovery.queryForInstances(name)} under a base path, with Curator's default JSON
 * serializer. Prints one JSON array of {@code "id address:port"}, sorted; fails when Curator
 * cannot read an instance.
 *
 * <pre>java -cp '&lt;dir&gt;/*' io.catalogbridge.peers.CuratorReader 127.0.0.1:2181 /services api_x</pre>
 */
public final class CuratorReader {
  private CuratorReader() {}

  public static void main(String[] args) throws Exception {
    if (args.length != 3) {
      System.err.println("usage: CuratorReader <connect string> <base path> <name>");
      System.exit(2);
    }
    try (CuratorFramework client =
        CuratorFrameworkFactory.newClient(args[0], 15_000, 5_000, new RetryNTimes(3, 500))) {
      client.start();
      if (!client.blockUntilConnected(15, TimeUnit.SECONDS)) {
        throw new IllegalStateException("no ZooKeeper connection to " + args[0]);
      }
      try (ServiceDiscovery<Void> discovery =
          ServiceDiscoveryBuilder.builder(Void.class).client(client).basePath(args[1]).build()) {
        discovery.start();
        Collection<ServiceInstance<Void>> instances = discovery.queryForInstances(args[2]);
        List<String> out = new ArrayList<>();
        for (ServiceInstance<Void> i : instances) {
          out.add("\"" + i.getId() + " " + i.getAddress() + ":" + i.getPort() + "\"");
        }
        out.sort(null);
        System.out.println("[" + String.join(",", out) + "]");
      }
    }
  }
}
